"""The ``vllm`` serving backend: hands serving to vLLM, for more traffic or adapters than one fmhub process serves.

``serve`` exports the base model and adapters as plain directories with
vLLM's arguments (`fmhub.serving.export`) and starts ``vllm serve`` on them
(`fmhub.serving.vllm_launch`); ``deploy`` swaps adapters on a running vLLM
through its runtime LoRA API (`fmhub.serving.vllm_client`). See
docs/serving-vllm.md. Imports are inside the methods: git's filter process
loads every plugin and must start fast.
"""

from __future__ import annotations

from fmhub import hookimpl


class VllmBackend:
    name = "vllm"

    def __init__(self, deploy_dir: str | None = None) -> None:
        self.deploy_dir = deploy_dir  # None: $FMHUB_VLLM_DEPLOY_DIR, beside the server's export, or the user's cache

    def export(self, config, out_dir: str):
        """``fmhub serve --backend vllm --export-only DIR``: write everything vLLM needs to DIR, start nothing."""
        from fmhub.serving.export import export

        return export(config, out_dir)

    def serve(self, config):
        from fmhub.serving.vllm_launch import serve

        return serve(config)

    def deploy(self, url: str, adapters, token: str | None = None):
        from fmhub.serving.vllm_client import deploy

        return deploy(url, adapters, token, self.deploy_dir)


@hookimpl
def fmhub_serving_backends():
    return [VllmBackend()]
