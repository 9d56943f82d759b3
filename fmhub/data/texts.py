"""Small text datasets for Fisher estimation, masked fine-tuning and evaluation: load, tokenize, batch.

Data can be given as

* a list of strings (one example each),
* a list of token-id lists (already tokenized: used as they are),
* a ``.jsonl`` file: one JSON object a line, ``{"text": "..."}`` or
  ``{"input_ids": [...]}``,
* any other file (``.txt``): one example a line.

Blank lines are skipped. A file is read through the governance gate
(`fmhub.governance.gate`): refused when the read policy denies it, or when
`fmhub unlearn --remove` excluded it (these texts train or measure a model),
and rows a ``rows:`` rule withholds from the user are left out. Texts are tokenized with the model directory's
tokenizer when it has one (``tokenizer.json``, ``tokenizer_config.json``,
``tokenizer.model``, ``vocab.json``); otherwise with `ByteTokenizer`: the
UTF-8 bytes of the text, each taken modulo the model's vocabulary size (no
BOS/EOS), so tiny models built from a config, which ship no tokenizer, can be
trained and measured without downloading anything.

Batches are right-padded: ``labels`` are the input ids with padding set to
-100, and no attention mask is passed. In a causal LM a token attends only to
earlier positions, so padding after the real tokens cannot change their
logits: the mask would be redundant, and leaving it out keeps the forward pass
free of data-dependent branches (which ``torch.func.vmap`` cannot trace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

from fmhub.core.rows import DataError  # one error for a dataset that cannot be read or used, whichever reader found it
from fmhub.governance import gate

if TYPE_CHECKING:
    import torch

Data = Union[str, "os.PathLike[str]", Sequence[str], Sequence[Sequence[int]]]
"""What the functions taking ``data`` accept: see the module docstring."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json")
IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


@dataclass(frozen=True)
class ByteTokenizer:
    """Token id = UTF-8 byte value modulo ``vocab_size``; padding id 0. For models that ship no tokenizer."""

    vocab_size: int
    pad_token_id: int = 0
    name: str = "bytes"

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


def load_examples(data: Data) -> list[str] | list[list[int]]:
    """The examples of ``data`` (see the module docstring): all texts, or all token-id lists.

    :raises DataError: an unreadable file, a bad JSON line (named by file and
        line number), no examples, or texts mixed with token ids.
    """
    if isinstance(data, (str, os.PathLike)):
        examples: list[Any] = _read_file(os.fspath(data))
        where = os.fspath(data)
    else:
        examples = [list(x) if not isinstance(x, str) else x for x in data]
        where = "the data given"
    if not examples:
        raise DataError(f"{where}: no examples (give at least one non-blank line or text)")
    kinds = {isinstance(x, str) for x in examples}
    if len(kinds) > 1:
        raise DataError(f"{where}: mixes texts and token ids; give one kind")
    return examples


def _read_file(path: str) -> list[Any]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    rows = gate.open_rows(gate.Step("data file", path), path)
    try:
        lines = list(rows.lines("text"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    rows.record_withheld()
    if not path.endswith(".jsonl"):
        return [line.text for line in lines]
    out: list[Any] = []
    for line in lines:
        n, obj = line.number, line.row
        if line.problem is not None:  # nesting or a huge number too: one line, not a RecursionError
            raise DataError(f"{path}:{n}: {line.problem}")
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            out.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
            out.append([int(i) for i in obj["input_ids"]])
        else:
            raise DataError(f'{path}:{n}: each line needs {{"text": "..."}} or {{"input_ids": [...]}}')
    return out


def load_tokenizer(model_dir: str, vocab_size: int) -> Any:
    """The tokenizer saved in ``model_dir``, or a `ByteTokenizer` when there is none."""
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    return ByteTokenizer(vocab_size)


def tokenizer_name(tokenizer: Any) -> str:
    """A short description for metadata and reports."""
    return getattr(tokenizer, "name", None) or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def tokenize(examples: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any, vocab_size: int, max_length: int) -> list[list[int]]:
    """Token ids per example, truncated to ``max_length``.

    :raises DataError: an example with fewer than 2 tokens (nothing to predict
        after the first one) or with ids outside ``[0, vocab_size)``.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            ids = tokenizer.encode(ex)
        else:
            ids = [int(t) for t in ex]
        ids = ids[:max_length]
        if len(ids) < 2:
            raise DataError(f"example {i} has {len(ids)} token(s); a causal LM needs at least 2 to predict one")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise DataError(f"example {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id used for padding (it is never a label, so its value does not matter beyond being valid)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def collate(batch: Sequence[Sequence[int]], pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(input_ids, labels)``, both ``[B, L]`` int64, right-padded; labels are -100 on padding."""
    import torch

    length = max(len(x) for x in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[row, : len(x)] = ids[row, : len(x)]
    return ids, labels


def prepare(data: Data, model_dir: str, vocab_size: int, max_length: int) -> tuple[list[list[int]], Any]:
    """Load and tokenize ``data`` for the model in ``model_dir``: ``(token ids per example, tokenizer)``."""
    examples = load_examples(data)
    # token ids are used as they are; the ByteTokenizer then only supplies a padding id (never a label)
    tokenizer = load_tokenizer(model_dir, vocab_size) if isinstance(examples[0], str) else ByteTokenizer(vocab_size, name="pre-tokenized")
    return tokenize(examples, tokenizer, vocab_size, max_length), tokenizer
