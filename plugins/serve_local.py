"""The built-in serving backend ``local``: one transformers model, many LoRA adapters, continuous multi-adapter batching.

The engine is `fmhub.serving.engine`, the HTTP API `fmhub.serving.http`
(OpenAI-compatible), hot swaps go through its admin API (`fmhub.serving.deploy`).
"""

from __future__ import annotations

from fmhub import hookimpl


class LocalBackend:
    name = "local"

    def serve(self, config):
        from fmhub.serving.engine import Engine
        from fmhub.serving.http import HttpServer

        return HttpServer(Engine(config), config.host, config.port, config.admin_token)

    def deploy(self, url, adapters, token=None):
        from fmhub.serving.deploy import push

        return push(url, adapters, token)


@hookimpl
def fmhub_serving_backends():
    return [LocalBackend()]
