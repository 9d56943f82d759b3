"""Serving one base model with many adapters: sources, the adapter cache, the batching engine, the HTTP API,
deploys, the request router (`router`), and the vLLM export.

May import: every layer up to `fmhub.models` (base, project, plugin, core, governance, git, data, models).
"""
