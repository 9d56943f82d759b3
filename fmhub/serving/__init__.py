"""Serving one base model with many adapters: sources, the adapter cache, the batching engine, the HTTP API
(`http`: the server and its handler; `openai_requests` and `openai_responses`: OpenAI bodies in and out;
`sampling`: logit_bias, penalties and log-probabilities; `stops`: stop strings; `connections`: deadlines on every
connection), deploys, the request router (`router`), and the vLLM export.

May import: every layer up to `fmhub.models` (base, project, plugin, core, governance, git, data, models).
"""
