"""Hook specifications: the plugin author's manual.

A plugin is a module (or any object) with functions named after these hooks,
marked with ``fmhub.hookimpl``. It is found through the ``fmhub`` entry-point
group, the same way for fmhub's built-in plugins and for third-party ones::

    # pyproject.toml of your package
    [project.entry-points.fmhub]
    my-plugin = "my_package.my_plugin"

    # my_package/my_plugin.py
    from fmhub import hookimpl

    class Sparse:
        name = "prefer-sparse"
        needs_base = True
        def merge(self, name, base, load, sides, options): ...

    @hookimpl
    def fmhub_merge_strategies():
        return [Sparse()]

``fmhub plugins`` lists every plugin loaded and what it provides.

The "provider" hooks below each return a list of objects of one kind; fmhub
collects the lists of every plugin. Each object has a ``name``, unique within
its kind: when two plugins provide the same name, fmhub refuses to guess and
says which plugins clash. The shape of each kind is a ``typing.Protocol`` in
`fmhub.interfaces`.

Keep plugin modules cheap to import: the git filter process loads every plugin
at start-up, once per git command. Import heavy libraries (torch,
transformers) inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from fmhub.interfaces import (
        AccessPolicy,
        CheckpointFormat,
        DeltaCodec,
        Cleaner,
        DataBackend,
        Labeler,
        MergeStrategy,
        ServingBackend,
    )

hookspec = pluggy.HookspecMarker("fmhub")


@hookspec
def fmhub_checkpoint_formats() -> list[CheckpointFormat]:
    """Return the checkpoint file formats this plugin can store tensor by tensor.

    :return: a list of `fmhub.interfaces.CheckpointFormat` objects. The git
        clean filter asks each format's ``sniff`` in turn (plugins registered
        later first) and uses the first that recognises a file. fmhub ships
        ``safetensors``.

    A format's ``name`` is written into every manifest made with it; renaming it
    makes those manifests unreadable.
    """


@hookspec
def fmhub_delta_codecs() -> list[DeltaCodec]:
    """Return codecs that store a changed tensor as a delta against its previous version.

    :return: a list of `fmhub.interfaces.DeltaCodec` objects. When a tensor
        changes and delta storage is on (``git config fmhub.deltas true``), the
        clean filter asks every codec to ``encode`` the change and keeps the
        smallest delta that is under half the tensor's size (else the whole
        tensor). fmhub ships ``sparse`` (changed elements only), ``xor-zlib``
        (bitwise XOR, compressed) and ``lowrank`` (factors P·F plus a patch:
        a LoRA merged into its base).

    A codec's ``name`` is written into manifests (``delta NAME ...``); renaming
    it makes those manifests unreadable. Decoding must give back the exact
    bytes: fmhub checks the result's sha256 against the tensor's oid and
    refuses a codec that does not round-trip when encoding. A codec that can
    also encode within a tolerance defines ``encode_within`` (see
    `fmhub.interfaces.DeltaCodec`); fmhub checks the tolerance holds and marks
    such tensors ``approx`` in the manifest.
    """


@hookspec
def fmhub_merge_strategies() -> list[MergeStrategy]:
    """Return merge strategies: ways to combine one tensor changed on several sides.

    :return: a list of `fmhub.interfaces.MergeStrategy` objects. A strategy is
        chosen per path with the git attribute ``fmhub-merge=NAME`` (in
        ``.gitattributes``) or for all paths with ``git config fmhub.merge.strategy NAME``.
        The merge driver calls ``merge`` only for tensors changed differently on
        both sides; a tensor changed on one side takes that side without asking.
        ``fmhub merge`` calls it for every tensor not identical everywhere.
        Rules per tensor-name pattern live in ``.fmhub/merge.yaml`` or a recipe
        (docs/merge.md). fmhub ships ``ours``, ``theirs``, ``linear``,
        ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties``,
        ``fisher`` and ``slerp``; their arithmetic is in `fmhub.merge_math`.
    """


@hookspec(firstresult=True)
def fmhub_fisher_diagonal(model: str, tensor: str) -> Any:
    """Compute the diagonal Fisher information of one tensor of a model, for the ``fisher`` strategy.

    Called by ``fmhub merge`` for each model that has no ``fisher:`` file in
    the recipe, tensor by tensor, so an implementation can compute or look up
    Fisher diagonals on demand (from a cache, a dataset, another tool).

    :param model: the model as the recipe names it (a path or ``REV:PATH``).
    :param tensor: the tensor's name.
    :return: a ``torch.Tensor`` of the tensor's shape with non-negative
        values, or ``None`` to let the next plugin answer. When no plugin
        answers, the merge reports the tensor as missing its Fisher diagonal.
    """


@hookspec
def fmhub_cleaners() -> list[Cleaner]:
    """Return data cleaners (dedup, filters, redaction, ...).

    :return: a list of `fmhub.interfaces.Cleaner` objects, each a step that takes
        records and yields the records to keep.
    """


@hookspec
def fmhub_labelers() -> list[Labeler]:
    """Return labelling functions for weak supervision.

    :return: a list of `fmhub.interfaces.Labeler` objects, each voting a label
        (or abstaining with ``None``) for every record.
    """


@hookspec
def fmhub_data_backends() -> list[DataBackend]:
    """Return engines that run data pipelines' per-batch work (``fmhub clean``, ``fmhub label``).

    :return: a list of `fmhub.interfaces.DataBackend` objects. A pipeline picks
        one with ``backend: NAME`` in ``fmhub.yaml`` or ``--backend NAME``.
        fmhub ships ``serial`` (in the calling process), ``processes`` (a
        pool of local worker processes, the default) and ``ray`` (Ray tasks:
        a local Ray instance, or a cluster when ``RAY_ADDRESS`` is set).

    A backend only maps a function over batches and hands the results back in
    input order; the pipeline itself (reading, the steps that must see every
    row in order, writing, reports) stays in the calling process. So a
    backend never changes what a pipeline computes, only where.
    """


@hookspec
def fmhub_access_policies() -> list[AccessPolicy]:
    """Return access policies for datasets and models.

    :return: a list of `fmhub.interfaces.AccessPolicy` objects. A request is
        allowed when at least one policy allows it and none denies it.
    """


@hookspec
def fmhub_serving_backends() -> list[ServingBackend]:
    """Return serving backends that share one base model across many adapters.

    :return: a list of `fmhub.interfaces.ServingBackend` objects.
    """
