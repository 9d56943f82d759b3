"""Licence checks: may this dataset feed a pipeline, may these models' training data be mixed in a merge?

Datasets declare ``license:`` (an SPDX id) and ``consent:`` in fmhub.yaml;
pipelines copy them into their lineage records, so a merge can see the
licences behind every model it mixes. ``.fmhub/policy.yaml`` may add::

    licences:
      commercial: true        # the models are used commercially: non-commercial data is refused
      deny: [GPL-3.0]         # never use these
      require_known: true     # a dataset without a known licence is refused

Some mixes are refused with or without a policy, because no single licence
can cover the result: two different share-alike licences, share-alike with
non-commercial (the NC term is an extra restriction SA forbids), and
proprietary data with share-alike data.
"""

from __future__ import annotations

import os
from itertools import combinations
from typing import Any, Mapping, Optional

from fmhub.base.errors import FmhubError

PERMISSIVE = {"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "CC-BY-4.0", "CC0-1.0", "Unlicense", "ISC", "ODC-By-1.0", "PDDL-1.0"}
SHARE_ALIKE = {"CC-BY-SA-4.0", "CC-BY-SA-3.0", "GPL-3.0", "GPL-3.0-only", "GPL-3.0-or-later", "GPL-2.0", "AGPL-3.0", "ODbL-1.0"}
NON_COMMERCIAL = {"CC-BY-NC-4.0", "CC-BY-NC-SA-4.0", "CC-BY-NC-ND-4.0", "CC-BY-NC-3.0"}
PROPRIETARY = {"proprietary"}


class LicenceError(FmhubError):
    """A pipeline or merge that would use data against its licence or the repository's licence policy."""


def family(licence: Optional[str]) -> str:
    """``permissive``, ``share-alike``, ``non-commercial``, ``proprietary`` or ``unknown``; SPDX ids compare case-insensitively."""
    if not licence:
        return "unknown"
    for name, ids in (("non-commercial", NON_COMMERCIAL), ("share-alike", SHARE_ALIKE), ("permissive", PERMISSIVE), ("proprietary", PROPRIETARY)):
        if licence.lower() in {i.lower() for i in ids}:
            return name
    return "unknown"


def policy_settings(root: str) -> dict[str, Any]:
    """The ``licences:`` section of .fmhub/policy.yaml (empty without one); a broken policy raises, so callers fail closed.

    The policy comes with the repository: it is read within the policy's own
    size (a link to /dev/zero or a FIFO is refused, not read), and a file that
    is there but cannot be read, is not UTF-8 or does not parse is one
    `PolicyError` line, never a traceback and never "no policy".
    """
    from fmhub.base.boundedyaml import read_text
    from fmhub.governance.policy import MAX_POLICY_BYTES, POLICY_FILE, PolicyError, parse_policy

    path = os.path.join(root, POLICY_FILE)
    if not os.path.lexists(path):  # lexists: a dangling link is a policy that cannot be read, not a missing one
        return {}
    try:
        text = read_text(path, MAX_POLICY_BYTES, PolicyError, "a policy")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); the licence policy it holds is enforced, so fix it") from None
    model = parse_policy(text, path).model
    return model.licences.model_dump() if model.licences is not None else {}


def check_one(source: str, licence: Optional[str], settings: Mapping[str, Any]) -> list[str]:
    """Why the policy refuses ``source`` under ``licence`` on its own (empty: allowed)."""
    fam = family(licence)
    deny = {d.lower() for d in settings.get("deny") or []}
    problems = []
    if licence and licence.lower() in deny:
        problems.append(f"{source} is {licence}, which the licence policy denies")
    if fam == "non-commercial" and settings.get("commercial"):
        problems.append(f"{source} is {licence} (non-commercial) but the licence policy says the models are commercial")
    if fam == "unknown" and settings.get("require_known"):
        problems.append(f"{source} has {'unknown licence ' + repr(licence) if licence else 'no licence'}; the licence policy requires a known one")
    return problems


def check_mix(sources: Mapping[str, Optional[str]], settings: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Problems with using all ``sources`` (path -> SPDX id) in one model: each source against the policy, then each pair."""
    settings = settings or {}
    problems = [p for src, lic in sorted(sources.items()) for p in check_one(src, lic, settings)]
    for (a, la), (b, lb) in combinations(sorted(sources.items()), 2):
        fa, fb = family(la), family(lb)
        pair = {fa, fb}
        if fa == fb == "share-alike" and (la or "").lower() != (lb or "").lower():
            problems.append(f"{a} ({la}) and {b} ({lb}) are different share-alike licences: no licence satisfies both")
        elif pair == {"share-alike", "non-commercial"}:
            problems.append(f"{a} ({la}) and {b} ({lb}): share-alike forbids the extra non-commercial restriction")
        elif pair == {"share-alike", "proprietary"}:
            problems.append(f"{a} ({la}) and {b} ({lb}): share-alike data cannot go into a proprietary model")
    return problems


def dataset_terms(loaded: Any, input_name: str) -> dict[str, Any]:
    """The ``license``/``consent`` fmhub.yaml declares for a pipeline input (empty for a bare path): copied into lineage records."""
    ds = loaded.spec.datasets.get(input_name)
    return {"license": ds.license, "consent": ds.consent} if ds is not None else {}


def check_pipeline(loaded: Any, section: str, name: str, input_name: str, src: str) -> None:
    """Before a pipeline reads ``src``: refuse it when the licence policy does, naming the dataset and why."""
    from fmhub.governance.lineage import repo_root

    settings = policy_settings(repo_root(loaded.root))
    if not settings:
        return
    problems = check_one(input_name, dataset_terms(loaded, input_name).get("license"), settings)
    if problems:
        raise LicenceError(f"{section}.{name}: {problems[0]}; declare the right `license:` in fmhub.yaml or use another dataset")


def check_merge(models: list[str], cwd: str = ".") -> None:
    """Refuse a merge whose models' lineage mixes incompatible data licences (models without records add nothing)."""
    from fmhub.governance import lineage

    root = lineage.repo_root(cwd)
    sources: dict[str, Optional[str]] = {}
    for m in models:
        rev, path = m.split(":", 1) if ":" in m and not os.path.exists(m) else (None, m)
        try:
            graph = lineage.walk(path, rev, root)
        except lineage.LineageError:
            continue
        for node in graph.nodes.values():
            if node["kind"] == "dataset" and "license" in node:
                sources[node["path"]] = node["license"]
    problems = check_mix(sources, policy_settings(root))
    if problems:
        raise LicenceError(f"merge refused: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                           + "; leave one model out or relicense its data")
