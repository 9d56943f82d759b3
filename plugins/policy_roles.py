"""The ``roles`` access policy: role-based rules from the repository's ``.fmhub/policy.yaml`` (docs/policy.md).

Reads the policy through ``request.read_file`` (the work tree locally, the
governing revision on a server) and caches parsed policies by content, so a
check in git's filter process costs a read of a small file. A policy that
cannot be parsed denies every request it would govern (fail closed), with a
reason naming ``file:line``; without a policy file it has no opinion.
"""

from __future__ import annotations

from fmhub import hookimpl
from fmhub.plugin.records import AccessRequest, Decision

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from fmhub.governance.policy import Policy, PolicyError

# `fmhub.governance.policy.POLICY_FILE`, spelled out: the parser (pydantic, yaml) is imported only when a
# policy file exists, so a check in git's filter process without one costs a failed open
POLICY_FILE = ".fmhub/policy.yaml"


class RolePolicy:
    name = "roles"

    def _policy(self, data: bytes) -> Policy | PolicyError:
        from fmhub.governance.policy import parse_policy_bytes

        return parse_policy_bytes(data, POLICY_FILE)

    def check(self, request: AccessRequest) -> Decision | None:
        data = request.read_file(POLICY_FILE)
        if data is None:
            return None
        policy = self._policy(data)
        if isinstance(policy, Exception):  # a PolicyError
            return Decision(False, f"the access policy is broken, so access is denied until it is fixed: {policy}",
                            policy=self.name)
        verdict, column = policy.decide(request.principal, request.action, request.path, request.tensor, request.column)
        where = policy.where(verdict.line) if verdict.line else ""
        if verdict.effect == "allow":
            return Decision(True, where=where, policy=self.name)
        if verdict.line is None or ("default",) in policy.lines and policy.lines[("default",)] == verdict.line:
            reason = "the policy denies what no rule allows (default: deny)"
        else:
            reason = "restricted by the access policy"
        if column is not None and request.column is None:
            reason += f" (the file holds column {column!r})"
        return Decision(False, reason, verdict.roles_needed, verdict.placeholder, where, self.name)

    def row_filter(self, request: AccessRequest):
        """The rows of ``request.path`` the principal may read (a predicate), None when no row rule withholds any."""
        data = request.read_file(POLICY_FILE)
        if data is None:
            return None
        policy = self._policy(data)
        if isinstance(policy, Exception):  # a PolicyError
            return lambda _row: False  # fail closed (check() has already refused the file; this is belt and braces)
        return policy.row_filter(request.principal, request.path)


@hookimpl
def fmhub_access_policies():
    return [RolePolicy()]
