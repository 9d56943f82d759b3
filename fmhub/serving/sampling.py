"""One row's logits processed as OpenAI's API defines, and the log-probabilities a client asked for.

Processing (`processed`), in this order, on the float32 logits of one row:

- ``logit_bias``: ``{token id: bias}``, each bias in -100..100, added to that
  token's logit (-100 all but bans a token, 100 all but forces it);
- ``presence_penalty`` (-2..2) subtracted once from every token the row has
  generated so far, and ``frequency_penalty`` (-2..2) once per time it was
  generated: ``logit -= frequency * count + presence * (count > 0)``. As in
  OpenAI's description and vLLM, only generated tokens count, not the prompt.

Greedy decoding takes the argmax of the processed logits; sampling divides
them by the temperature and applies top_p (`fmhub.serving.engine._sample_row`).

Log-probabilities (`logprob_info`) are the log-softmax of the processed
logits, before temperature and top_p: the model's own distribution when no
bias or penalty is given (what vLLM returns by default, ``raw_logprobs``), and
with them the distribution a greedy pick is taken from, so a banned token
shows as banned. They do not depend on ``temperature``.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI caps it
BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0
MAX_COMPLETION_LOGPROBS = 5  # completions' ``logprobs``, as OpenAI caps it
MAX_TOP_LOGPROBS = 20  # chat's ``top_logprobs``, as OpenAI caps it
GREEDY_BELOW = 1e-5  # a temperature this small samples greedily, as in vLLM (dividing by it overflows float32)
LOGPROB_FLOOR = -9999.0  # what an impossible token's -inf is reported as (JSON has no infinity; vLLM does the same)


def needs_processing(params: Any) -> bool:
    """Does this row need its own pass over the logits (a bias, a penalty, log-probabilities)?"""
    return bool(params.logit_bias) or bool(params.presence_penalty) or bool(params.frequency_penalty) \
        or params.logprobs is not None


def processed(logits: torch.Tensor, params: Any, generated: list[int]) -> torch.Tensor:
    """One row's logits (float32, a copy) with ``params``' logit_bias and penalties applied; ``generated`` are the
    row's tokens so far."""
    x = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=x.device)
        x.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=x.dtype, device=x.device))
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=x.device), minlength=x.shape[0])
        counts = counts[: x.shape[0]].to(x.dtype)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def logprob_info(x: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the processed logits ``x`` and the ``top`` most likely tokens with
    theirs, most likely first."""
    lp = torch.log_softmax(x, -1).clamp_(min=LOGPROB_FLOOR)
    chosen = float(lp[token])
    if top <= 0:
        return chosen, []
    values, ids = lp.topk(min(top, lp.shape[0]))
    return chosen, list(zip(ids.tolist(), values.tolist()))
