"""Built-in plugin: the ``model`` labeler, a local transformers text classifier as a labelling function.

``{path: models/sentiment, map: {LABEL_0: negative, LABEL_1: positive}, min_score: 0.8}``
loads ``transformers.pipeline("text-classification")`` from a model directory
(relative to ``fmhub.yaml``) and votes the class its top label maps to,
abstaining when the top score is below ``min_score`` or the label is not in
``map``. Without ``map`` the model's labels must be the pipeline's class
names. Other options: ``batch_size`` (32), ``max_length`` (512, longer texts
are truncated), ``device`` (``auto``: the first GPU if torch sees one, else
``cpu``; or ``cpu``, ``cuda``, ``cuda:1``), ``column``.

It never downloads: the path must be a local directory saved with
``save_pretrained`` (config, weights, tokenizer). It runs in the calling
process (``in_driver``), batched, whatever the backend: one copy of the model
serves every batch, instead of one per worker process. transformers is
imported on the first batch, so configuring it (in every worker) is cheap.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from fmhub import hookimpl
from fmhub.plugin.interfaces import LabelContext
from fmhub.plugin.options import OptionError, Options, check_class, parse_options, row_text


class _ModelLF:
    in_driver = True

    def __init__(self, name: str, path: str, column: str, mapping: Mapping[str, str] | None, min_score: float,
                 batch_size: int, max_length: int, device: str, classes: Sequence[str]) -> None:
        self.name, self.path, self.column = name, path, column
        self.mapping, self.min_score, self.batch_size, self.max_length = mapping, min_score, batch_size, max_length
        self.device, self.classes = device, classes
        self._pipe = None

    def _load(self):
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        except ImportError as exc:
            raise OptionError(f"{self.name}: needs transformers and torch ({exc}); pip install 'fmhub[models]'") from None
        try:
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise OptionError(f"{self.name}: cannot load a text-classification model from {self.path} ({exc})") from None
        labels = set(model.config.id2label.values())
        if self.mapping is None:
            if not labels & set(self.classes):
                raise OptionError(
                    f"{self.name}: the model's labels ({', '.join(sorted(map(str, labels)))}) are not class names; add map: {{model label: class}}"
                )
        elif not labels & set(self.mapping):
            raise OptionError(f"{self.name}: map names none of the model's labels ({', '.join(sorted(map(str, labels)))})")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._pipe = pipeline("text-classification", model=model, tokenizer=tok, device=device)
        return self._pipe

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        pipe = self._pipe or self._load()
        texts = [row_text(row, self.column) for row in rows]
        todo = [i for i, t in enumerate(texts) if t]
        out: list[str | None] = [None] * len(rows)
        if not todo:
            return out
        preds = pipe([texts[i] for i in todo], batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        for i, pred in zip(todo, preds):
            if isinstance(pred, list):  # some versions wrap the top label in a list
                pred = pred[0]
            if pred["score"] < self.min_score:
                continue
            label = pred["label"]
            out[i] = self.mapping.get(label) if self.mapping is not None else (label if label in self.classes else None)
        return out


class ModelOptions(Options):
    path: str
    map: Optional[dict] = None
    min_score: float = 0.0
    batch_size: int = 32
    max_length: int = 512
    device: str = "auto"
    column: Optional[str] = None


class Model:
    name = "model"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _ModelLF:
        o = parse_options(self.name, ModelOptions, options, context)
        path, mapping, min_score, batch_size, max_length, device = o.path, o.map, o.min_score, o.batch_size, o.max_length, o.device
        column = o.column or context.column
        full = path if os.path.isabs(path) else os.path.join(context.base_dir, path)
        if not os.path.isfile(os.path.join(full, "config.json")):
            raise OptionError(f"model: {path!r} is not a local model directory (no config.json in {full}); fmhub never downloads models")
        if mapping is not None:
            for label, cls in mapping.items():
                check_class(str(cls), context, f"model: map[{label!r}]")
            mapping = {str(k): str(v) for k, v in mapping.items()}
        if not 0.0 <= min_score <= 1.0 or batch_size < 1 or max_length < 1:
            raise OptionError("model: min_score must be in [0, 1], batch_size and max_length at least 1")
        name = f"model:{os.path.basename(os.path.normpath(path))}"
        return _ModelLF(name, full, column, mapping, min_score, batch_size, max_length, device, context.classes)


@hookimpl
def fmhub_labelers():
    return [Model()]
