"""Secure aggregation (Bonawitz et al. 2017, pairwise masks): the data scientist sees only the sum.

Sites that pin each other's identities (`[secure_aggregation] peers`) mask every model update so
that only the sum over a session's sites can be read: `keys.py` (identities, signed per-session
keys), `masks.py` (fixed-point encoding, pairwise ChaCha20 masks), `sessions.py` (a session masks
once; the same weights keep their participants), `release.py` (a site's checks and its masked
release). The orchestrator's side is `analyses/federation/secure_sum.py`. A site that drops out
after the others masked leaves masks that do not cancel: the round fails, nothing is aggregated,
and it is redone with a new session once the same sites answer.
"""
