"""Which signals each enterprise consumer may see, decided by casbin over the policy.

RBAC with glob patterns (casbin's globMatch: `*` is one path segment, `**` any number of
them; ADR 0005): `consumers` put identities in roles, `roles` give roles signal path
patterns. casbin is asked once per (identity, signal) when a consumer's view is built
(at connect or subscribe time, and again when the policy changes), never per record: the
hot path only tests membership in the resulting set. Call it from one thread only.
"""

from __future__ import annotations

import casbin

from broker.policy.schema import Policy

_MODEL = """
[request_definition]
r = sub, obj

[policy_definition]
p = sub, obj

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub) && globMatch(r.obj, p.obj)
"""

_ROLE_PREFIX = "role:"  # keeps role names and identities in separate name spaces


class Access:
    def __init__(self, policy: Policy) -> None:
        model = casbin.Model()
        model.load_model_from_text(_MODEL)
        self._enforcer = casbin.Enforcer(model)
        self._enforcer.add_policies(
            [[_ROLE_PREFIX + r.name, pattern] for r in policy.roles for pattern in r.signals]
        )
        self._enforcer.add_grouping_policies(
            [[c.identity, _ROLE_PREFIX + role] for c in policy.consumers for role in c.roles]
        )
        self._signals = [s.path for s in policy.signals if s.lifecycle == "approved"]  # published
        self._known = frozenset(c.identity for c in policy.consumers)

    def knows(self, identity: str) -> bool:
        return identity in self._known

    def visible_to(self, identity: str) -> frozenset[str]:
        """The signals `identity` may see; empty for an identity the policy does not name."""
        if identity not in self._known:
            return frozenset()
        return frozenset(s for s in self._signals if self._enforcer.enforce(identity, s))

    def views(self) -> dict[str, frozenset[str]]:
        """Every named consumer's visible signals (for review and diff)."""
        return {identity: self.visible_to(identity) for identity in sorted(self._known)}
