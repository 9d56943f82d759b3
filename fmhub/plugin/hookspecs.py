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

``fmhub plugins`` lists every plugin loaded and what it provides; docs/plugins.md
is the guide to writing, packaging and testing one.

The "provider" hooks below each return a list of objects of one kind; fmhub
collects the lists of every plugin. Each object has a ``name``, unique within
its kind: when two plugins provide the same name, fmhub refuses to guess and
says which plugins clash when that name is used (other names work). The shape
of each kind is a ``typing.Protocol`` in `fmhub.plugin.interfaces`; an object
is checked against it when first used.

A function named ``fmhub_*`` that is not one of these hooks (a typo) makes
the plugin refused, as does one that fails to import; ``FMHUB_DISABLE_PLUGINS``
(entry-point names, comma-separated) turns plugins off (`fmhub.plugin.host`).

Keep plugin modules cheap to import: git's filter process, started once per
git command, imports every third-party plugin (fmhub cannot tell which kinds
a plugin provides before importing it). Import heavy libraries (torch,
transformers, numpy, pydantic) inside the functions that need them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # annotations only: the plugin host imports this module in git's filter, where typing costs ~9 ms
if TYPE_CHECKING:
    from typing import Any

    from fmhub.plugin.interfaces import (
        AccessPolicy,
        CheckpointFormat,
        Cleaner,
        DataBackend,
        DataFormat,
        DeltaCodec,
        Labeler,
        MergeStrategy,
        ServingBackend,
    )


def hookspec(function=None, *, kind=None, firstresult=False, historic=False, warn_on_impl=None, warn_on_impl_args=None):
    """Marks a hook specification: what ``pluggy.HookspecMarker("fmhub")`` does (it sets ``fmhub_spec``, which
    pluggy reads in `add_hookspecs`), without importing pluggy, so the host can read this module in git's filter.

    ``kind`` names the kind of object a *provider* hook returns a list of, as users name it (``cleaner``,
    ``merge-strategy``): `fmhub.plugin.host.KINDS` is made from it, and the hook's return annotation
    (``list[Cleaner]``) names the `fmhub.plugin.interfaces` Protocol its objects are checked against.
    """

    def mark(func):
        if historic and firstresult:
            raise ValueError("cannot have a historic firstresult hook")
        func.fmhub_spec = {"firstresult": firstresult, "historic": historic, "warn_on_impl": warn_on_impl,
                           "warn_on_impl_args": warn_on_impl_args}
        if kind is not None:
            func.fmhub_kind = kind
        return func

    return mark if function is None else mark(function)


@hookspec(kind="format")
def fmhub_checkpoint_formats() -> list[CheckpointFormat]:
    """Return the checkpoint file formats this plugin can store tensor by tensor.

    :return: a list of `fmhub.plugin.interfaces.CheckpointFormat` objects. The git
        clean filter asks each format's ``sniff`` in turn (plugins registered
        later first) and uses the first that recognises a file. fmhub ships
        ``safetensors``.

    A format's ``name`` is written into every manifest made with it; renaming it
    makes those manifests unreadable.
    """


@hookspec(kind="data-format")
def fmhub_data_formats() -> list[DataFormat]:
    """Return data file formats (datasets) that fmhub stores as content-defined chunks and diffs by rows.

    :return: a list of `fmhub.plugin.interfaces.DataFormat` objects. The clean filter
        uses one for a file no checkpoint format recognises: the first whose
        ``sniff`` accepts the file's first bytes, else the first whose
        ``extensions`` end the path. fmhub ships ``jsonl`` (chunks end at line
        ends) and ``parquet`` (byte-level chunks). ``git diff`` reads both sides
        through ``rows``.

    A format's ``name`` is written into every manifest made with it; renaming it
    makes those manifests unreadable. Names share one space with checkpoint formats.
    """


@hookspec(kind="delta-codec")
def fmhub_delta_codecs() -> list[DeltaCodec]:
    """Return codecs that store a changed tensor as a delta against its previous version.

    :return: a list of `fmhub.plugin.interfaces.DeltaCodec` objects. fmhub ships
        ``planes`` (frames coded as unchanged, changed elements, or a zigzag
        difference in byte planes, zstd where it pays: what the clean filter
        writes), ``lowrank-fixed`` (integer low-rank factors plus a residual
        in planes frames: a LoRA merged into its base; tried by the clean
        filter only when a rank probe says so), ``lowrank`` (float factors:
        `fmhub adapter merge` and storage within a tolerance), and, to read
        older repositories, ``sparse`` and ``xor-zlib``.

    The clean filter does not try every codec on every changed tensor (that
    cost tens of times git-lfs's time at 1 GiB): it codes the change with
    ``planes``, at about the speed of memory. Every installed codec is asked
    to ``encode`` by `fmhub repack` and when the user set a tolerance or
    ``fmhub.lowrank.strict``; the smallest delta under half the tensor wins.
    Any installed codec decodes the links that name it.

    A codec's ``name`` is written into manifests (``delta NAME ...``); renaming
    it makes those manifests unreadable. Decoding must give back the exact
    bytes: fmhub checks the result's sha256 against the tensor's oid and
    refuses a codec that does not round-trip when encoding. A codec that can
    also encode within a tolerance defines ``encode_within`` (see
    `fmhub.plugin.interfaces.DeltaCodec`); fmhub checks the tolerance holds and marks
    such tensors ``approx`` in the manifest.
    """


@hookspec(kind="merge-strategy")
def fmhub_merge_strategies() -> list[MergeStrategy]:
    """Return merge strategies: ways to combine one tensor changed on several sides.

    :return: a list of `fmhub.plugin.interfaces.MergeStrategy` objects. A strategy is
        chosen per path with the git attribute ``fmhub-merge=NAME`` (in
        ``.gitattributes``) or for all paths with ``git config fmhub.merge.strategy NAME``.
        The merge driver calls ``merge`` only for tensors changed differently on
        both sides; a tensor changed on one side takes that side without asking.
        ``fmhub merge`` calls it for every tensor not identical everywhere.
        Rules per tensor-name pattern live in ``.fmhub/merge.yaml`` or a recipe
        (docs/merge.md). fmhub ships ``ours``, ``theirs``, ``linear``,
        ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties``,
        ``fisher`` and ``slerp``; their arithmetic is in `fmhub.models.merge_math`.
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


@hookspec(kind="cleaner")
def fmhub_cleaners() -> list[Cleaner]:
    """Return kinds of cleaning steps for ``fmhub clean`` (filters, redaction, dedup, ...).

    :return: a list of `fmhub.plugin.interfaces.Cleaner` objects. fmhub ships
        ``length``, ``regex``, ``quality`` (plugins/clean_filters.py),
        ``language`` (plugins/clean_language.py), ``pii``
        (plugins/clean_pii.py), ``schema`` (plugins/clean_schema.py),
        ``dedup`` and ``near-dup`` (plugins/clean_dedup.py).

    A pipeline in ``fmhub.yaml`` lists steps as ``- NAME: {options}``::

        clean:
          web:
            input: crawl              # a dataset, or a .jsonl/.parquet path
            output: crawl.clean.jsonl
            steps:
              - pii: {kinds: [email, key]}
              - my-filter: {limit: 3, columns: [title, body]}

    **Configure.** fmhub calls ``cleaner.configure(options, context)`` once per
    step, in the calling process, before reading any row. ``options`` is the
    step's mapping as written, without ``columns`` (fmhub reads that one for
    every step); ``context`` is a `fmhub.plugin.interfaces.CleanContext`: the text
    ``columns`` the step looks at (its ``columns:``, else the pipeline's, else
    the dataset's text column) and ``base_dir`` (the spec's directory).
    Validate everything here: raise `fmhub.plugin.options.OptionError(message,
    option=KEY)` and fmhub reports ``fmhub.yaml:LINE: clean.P.steps[i].NAME.KEY:
    message`` (``ValueError`` and ``TypeError`` point at the step).
    `fmhub.plugin.options.parse_options` does this for a pydantic model of the
    options. Return a *config*: anything picklable (plain data, compiled
    regexes, a frozen dataclass). It is sent to the workers with every
    batch; the cleaner object itself is not: workers look it up by name
    through their own plugin host, so a cleaner keeps no state of its own.

    **Row scope** (``scope = "row"``): ``clean(rows, config)`` gets a list of
    rows (dicts, at most ``batch_size``), the ones earlier steps kept, as
    earlier steps edited them, and returns one verdict per row, in order:
    ``None`` keeps the row, `fmhub.plugin.interfaces.Drop(reason, detail, shown)`
    drops it, `fmhub.plugin.interfaces.Edit(row, reason, detail)` replaces it. It
    runs in the data backend's workers (other processes, other machines),
    on batches in any order, so it must judge each row alone. Never change
    a row in place: an Edit carries a new dict. `fmhub.plugin.options.text_of`
    gives a row's text in the step's columns (or the Drop for a row without).

    **Dataset scope** (``scope = "dataset"``): for steps that must see rows in
    order with memory, like dedup. ``prepare(rows, config)`` (optional) runs
    in the workers on the rows that reach the step and returns one picklable
    value per row, the expensive per-row part (a hash, a MinHash signature).
    ``open(config)`` is called once per run in the calling process and
    returns a `fmhub.plugin.interfaces.DatasetPass`, whose ``clean(positions,
    prepared)`` receives every row that reaches the step, in input order,
    batch after batch: their positions and prepared values (the rows
    themselves when there is no ``prepare``); it returns ``None`` or a
    `Drop` per row. A dataset step never edits rows.

    **Verdicts and reports.** Every Drop and Edit becomes a line of the run's
    report with the row's position, row hash, step and ``reason``: keep the
    reason to one line that says why ("3 words < min_words 5", "near-duplicate
    of position 12 (Jaccard ≈ 0.91)") and never put sensitive text in it.
    ``detail`` is optional JSON data for tools; ``shown`` replaces the row in
    reports' text excerpts (a redacted copy, for a step that drops rows for
    what they contain). An exception in ``clean`` or ``prepare`` stops the run
    (the output is not written) and reaches the user as raised.
    """


@hookspec(kind="labeler")
def fmhub_labelers() -> list[Labeler]:
    """Return kinds of labelling functions for weak supervision (``fmhub label``).

    :return: a list of `fmhub.plugin.interfaces.Labeler` objects. fmhub ships
        ``keyword``, ``regex``, ``lookup`` (plugins/label_rules.py), ``python``
        (plugins/label_python.py) and ``model`` (a local transformers
        text-classification model, plugins/label_model_based.py).

    Each entry of a pipeline's ``lfs:`` list in ``fmhub.yaml`` names a kind
    and its options::

        label:
          sentiment:
            input: reviews            # a dataset, or a .jsonl/.parquet path
            output: reviews.labelled.jsonl
            classes: [negative, positive]
            lfs:
              - keyword: {words: [great, love], label: positive}
              - my-kind: {name: my-rule, threshold: 0.5, label: negative}

    fmhub calls ``labeler.configure(options, context)`` once per entry (in the
    calling process, and once in each worker process): ``options`` is the
    entry's mapping as written (with ``name`` removed: it is the entry's display
    name, else fmhub uses the function's own ``name``, e.g. ``keyword:great,love``);
    ``context`` is a `fmhub.plugin.interfaces.LabelContext` with the pipeline's class
    names, text column and the spec's directory. Refuse unknown or bad
    options there by raising `fmhub.plugin.options.OptionError` with a one-line
    message; fmhub prefixes ``fmhub.yaml:LINE: label.NAME.lfs[i]:``. The
    helpers in `fmhub.plugin.options` read typed options and a row's text.

    The returned `fmhub.plugin.interfaces.LabellingFunction` gets rows in batches
    (``vote(rows)``, rows are dicts, at most the pipeline's ``batch_size``) and
    returns one vote per row: a class name from ``context.classes``, or
    ``None`` to **abstain** (the function has no opinion on that row).
    Abstaining is normal and cheap: a keyword rule abstains on most rows. A
    vote that is not a class name is recorded as an error for that row. An
    exception fails the batch, and fmhub retries it row by row, recording
    each failing row's position and message and counting it as an abstain; a
    function that fails on every row stops the run with its name.

    Functions run in the pipeline's data backend (worker processes by
    default), so ``configure`` must be cheap and everything the function needs
    must come from its options: they are sent to the workers, not the
    function object. A function holding a big model sets ``in_driver = True``
    to run once, in the calling process, instead.

    The same kinds define slices of evaluation rows (``slices: {NAME: {lf:
    {KIND: {options}}, vote: CLASS}}``, docs/monitoring.md): there
    ``configure`` gets a context whose classes are the task's plus the slice's
    ``vote``, and ``vote`` gets every evaluated row in one call, in the calling
    process. A patch's ``label:`` pipeline runs them as ``fmhub label`` does.
    """


@hookspec(kind="data-backend")
def fmhub_data_backends() -> list[DataBackend]:
    """Return engines that run data pipelines' per-batch work (``fmhub clean``, ``fmhub label``).

    :return: a list of `fmhub.plugin.interfaces.DataBackend` objects. A pipeline picks
        one with ``backend: NAME`` in ``fmhub.yaml`` or ``--backend NAME``.
        fmhub ships ``serial`` (in the calling process), ``processes`` (a
        pool of local worker processes, the default) and ``ray`` (Ray tasks:
        a local Ray instance, or a cluster when ``RAY_ADDRESS`` is set).

    A backend only maps a function over batches and hands the results back in
    input order; the pipeline itself (reading, the steps that must see every
    row in order, writing, reports) stays in the calling process. So a
    backend never changes what a pipeline computes, only where.
    """


@hookspec(kind="access-policy")
def fmhub_access_policies() -> list[AccessPolicy]:
    """Return access policies: who may read or write which files, tensors and columns.

    :return: a list of `fmhub.plugin.interfaces.AccessPolicy` objects. fmhub ships
        ``roles`` (plugins/policy_roles.py), the role-based rules of
        ``.fmhub/policy.yaml`` (docs/policy.md).

    fmhub asks every policy, through `fmhub.governance.access`, at each place bytes flow:
    **smudge** (one request for the file, one per tensor of a checkpoint;
    a denied file is not materialized), **``fmhub clean``/``label``** (one
    request per column a pipeline reads, before any row is read) and
    **``fmhub server``**: `fmhub.server.guard` asks one request per object of
    a batch download, direct GET or verify, for each path (and tensor) of a
    protected branch that names the object, and `fmhub.server.receive` one
    ``write`` request per changed path and tensor of each pushed commit, so
    enforcement does not rely on the client.

    ``check(request)`` gets a `fmhub.plugin.interfaces.AccessRequest` and returns a
    `fmhub.plugin.interfaces.Decision` or ``None`` (no opinion). Any deny wins; a
    request no policy denies is allowed, so a policy that wants "deny unless
    allowed" answers deny itself (``default: deny``). Read configuration with
    ``request.read_file(path)`` (the repository at the governing revision);
    cache what you parse, keyed by its content: checks run once per file and
    tensor in git's filter process. When your configuration is broken, deny
    (fail closed) with a reason naming ``file:line``. A deny's ``reason`` is
    shown to the requester: never put restricted content or other users'
    names in it; name the roles that would allow it in ``roles``. fmhub
    records every deny (and every allow of a governed request) in the audit
    log (``what: access``).
    """


@hookspec(kind="serving-backend")
def fmhub_serving_backends() -> list[ServingBackend]:
    """Return serving backends that share one base model across many adapters.

    :return: a list of `fmhub.plugin.interfaces.ServingBackend` objects. fmhub ships
        ``local`` (plugins/serve_local.py: its own engine with multi-adapter
        batching and a tiered adapter cache, docs/serving.md) and ``vllm``
        (plugins/serve_vllm.py: hands serving to vLLM, docs/serving-vllm.md).

    ``fmhub serve --backend NAME`` calls ``serve(config)`` with a
    `fmhub.serving.config.ServeConfig`: the base and the adapters as
    `fmhub.serving.sources.Source` objects (a directory, or a path at a
    commit; ``materialize`` writes one out, ``view()`` reads its tensors),
    host and port, cache sizes, ``backend_options`` for what only your backend
    reads. Return once the server answers, with a handle that has ``url``,
    ``wait()`` (block until stopped; Ctrl-C stops) and ``stop()``. Raise
    ``FmhubError`` with what to do when the backend cannot serve the config
    (an option it does not support, an adapter it cannot serve).

    ``fmhub deploy --backend NAME`` calls ``deploy(url, adapters, token)``:
    make the running server at ``url`` serve exactly ``adapters`` without a
    restart, comparing each adapter's ``source.version`` with what the server
    holds, and return a `fmhub.serving.deploy.DeployReport`. A backend that
    can write its model and adapters for another machine may add
    ``export(config, out_dir)`` (``fmhub serve --export-only DIR``).
    """


HOOKS = tuple(name for name, f in list(globals().items()) if hasattr(f, "fmhub_spec"))
"""Every hook, in this module's order."""
KINDS = {name: globals()[name].fmhub_kind for name in HOOKS if hasattr(globals()[name], "fmhub_kind")}
"""Provider hook -> the kind of object it returns, as users name it (its ``kind=``)."""
