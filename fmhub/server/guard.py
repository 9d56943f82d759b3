"""The server's decisions for one repository: who is an admin, who may read which object; each one audited.

Reading (docs/server.md, "Who may read what"): a user may download an
object when

1. they administer the repository (a token's ``admin`` list, or the
   policy's admin role at the primary protected branch), or
2. a path at a protected branch names it and the policy at that branch lets
   them read that path (and tensor), or
3. only unprotected refs name it and they may read every path of the
   primary branch (a repository-wide reader), or
4. they uploaded it themselves (the server checked they had its bytes).

Nothing else widens it: a ref a user pushed never makes an object readable
to others unless rule 3 applies, and pushes that name objects their pusher
could not read are refused (`fmhub.server.receive`). Denials never depend
on whether the object is stored, so they reveal neither its existence nor
its size.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from fmhub.governance.audit import AuditLog
from fmhub.plugin.records import AccessRequest, Decision
from fmhub.server.index import POLICY_PATH, IndexState, RepoIndex
from fmhub.server.tokens import Principal
from fmhub.server.uploads import Uploads

ADMIN_ROLE = "admin"


class RepoGuard:
    def __init__(self, name: str, path: str, audit_key: Optional[bytes] = None, admin_role: str = ADMIN_ROLE) -> None:
        self.name, self.path, self.admin_role = name, path, admin_role
        self.index = RepoIndex(path)
        self.uploads = Uploads(path)
        self.log = AuditLog(os.path.join(path, "fmhub", "audit.log"), audit_key)

    # -- the policy --------------------------------------------------------------------

    def policy(self, state: IndexState, ref: Optional[bytes] = None):
        """The parsed policy at ``ref`` (default: the primary branch): a Policy, a PolicyError, or None (no policy file)."""
        from fmhub.governance.policy import parse_policy_bytes

        ref = ref or state.primary
        data = state.reader(ref)(POLICY_PATH) if ref in state.tips else None
        return None if data is None else parse_policy_bytes(data, POLICY_PATH)

    def policy_problem(self, state: IndexState) -> Optional[str]:
        """Why the primary branch's policy cannot govern (fail closed), or None."""
        if state.primary is None:
            return "the repository has no default branch (HEAD names none)"
        if not state.primary_exists():
            return f"the protected branch {state.primary.decode()} does not exist"
        pol = self.policy(state)
        if isinstance(pol, Exception):
            return f"the policy at {state.primary.decode()} is broken: {pol}"
        return None

    def is_admin(self, principal: Principal, state: IndexState) -> bool:
        if principal.is_admin_of(self.name):
            return True
        pol = self.policy(state)
        return pol is not None and not isinstance(pol, Exception) and self.admin_role in pol.roles_of(principal.user)

    def reads_everything(self, principal: Principal, state: IndexState) -> bool:
        from fmhub.governance import access

        if self.is_admin(principal, state):
            return True
        if self.policy_problem(state):
            return False
        pol = self.policy(state)
        if pol is not None and not pol.reads_everything(principal.user):
            return False
        req = AccessRequest(principal.user, "read", self.name, None, read_file=state.reader(state.primary))
        return access.decide(req)[0].allowed

    # -- reading objects ---------------------------------------------------------------

    def read_denial(self, principal: Principal, oid: str, state: IndexState) -> tuple[Optional[str], str]:
        """(None, why) when ``principal`` may read ``oid``; else (the one-line message to send, why)."""
        from fmhub.governance import access

        if self.is_admin(principal, state):
            return None, "admin"
        first: Optional[Decision] = None
        for ref, path, tensor in sorted(state.owners.get(oid, ()), key=lambda o: (o[0], o[1], o[2] or "")):
            req = AccessRequest(principal.user, "read", self.name, path, tensor=tensor, oid=oid, read_file=state.reader(ref))
            d, _governed = access.decide(req)
            if d.allowed:
                return None, f"{ref.decode()}:{path}"
            first = first or d
        if oid in state.named and self.reads_everything(principal, state):
            return None, "repository-wide reader"
        if self.uploads.by(oid, principal.user):
            return None, "uploader"
        msg = f"access denied: {principal.user} may not read object {oid}"
        if first is not None:
            msg += f": {first.reason or 'restricted by the access policy'}"
            msg += f" ({first.where})" if first.where else ""
            msg += f"; ask a maintainer for role {' or '.join(repr(r) for r in first.roles)}" if first.roles else ""
        return msg, (first.where or first.reason) if first is not None else "not readable at a protected branch"

    def check_read(self, principal: Principal, oid: str, via: str) -> Optional[str]:
        """None when ``principal`` may read ``oid`` (recorded), else the message to send (recorded).

        An allowed download is recorded without waiting for the disk: every
        object of a clone passes here, and 32 threads each holding the log's
        lock through an fdatasync were the server's bottleneck. Denials are synced.
        """
        denied, why = self.read_denial(principal, oid, self.index.state())
        self.record(principal.user, oid, "deny" if denied else "allow", {"action": "read", "via": via, "why": why},
                    sync=bool(denied))
        return denied

    def check_reads(self, principal: Principal, oids: Iterable[str], via: str) -> dict[str, str]:
        """{oid: message} for the objects ``principal`` may not read; one audit entry for the allowed, one for the denied."""
        state = self.index.state()
        allowed, denied = [], {}
        for oid in dict.fromkeys(oids):
            msg, _why = self.read_denial(principal, oid, state)
            if msg is None:
                allowed.append(oid)
            else:
                denied[oid] = msg
        if allowed:
            self.record(principal.user, "batch", "allow", {"action": "read", "via": via, "objects": allowed})
        if denied:
            self.record(principal.user, "batch", "deny", {"action": "read", "via": via, "objects": sorted(denied)})
        return denied

    # -- the audit log -----------------------------------------------------------------

    def record(self, who: Optional[str], target: str, decision: str, details: dict, what: str = "access", sync: bool = True) -> None:
        try:
            self.log.append(what, target, decision, {"repo": self.name, **details}, who=who or "", sync=sync)
        except OSError as exc:
            print(f"fmhub server: warning: cannot write the audit log {self.log.path}: {exc.strerror}", file=sys.stderr)

