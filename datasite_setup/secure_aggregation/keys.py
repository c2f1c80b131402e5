"""The keys of secure aggregation: a site's long-term identity, and one key pair per session.

Each site has a secret seed (`secrets/secure_aggregation_seed`, 0600, created once). From it come
its Ed25519 identity key, whose public half the site admins exchange out of band and pin in each
other's configs (`[secure_aggregation] peers`), and, per data scientist and session, an X25519 key
pair (HKDF of the seed with both in its info), so nothing per session needs storing. A session
key is handed out signed by the identity key; a site masks only with peers whose session keys
verify against the pinned identities, so the orchestrator that relays the keys (the data
scientist) cannot slip in keys of her own and unmask a site's update. The shared secret of a pair
is their X25519 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

SESSION_INFO = b"medfed-secagg-session|"
IDENTITY_INFO = b"medfed-secagg-identity"


class PeerKeyRefused(ValueError):
    """A peer's session key that is not signed by the identity this site pinned for it."""


def _derive(seed: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def _signed_text(site: str, session: str, public_key: bytes) -> bytes:
    return b"|".join([b"medfed-secagg-key", site.encode(), session.encode(), public_key])


@dataclass(frozen=True)
class SiteKeys:
    """One site's secure-aggregation keys, from its secret seed."""

    site: str
    seed: bytes

    def identity_public(self) -> str:
        """The hex Ed25519 public key other sites pin for this one."""
        from cryptography.hazmat.primitives import serialization

        key = self._identity().public_key()
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    def session_key(self, who: str, session: str) -> dict[str, str]:
        """This site's public session key for `who`'s `session`, signed: what the orchestrator relays."""
        public = self._session_private(who, session).public_key().public_bytes_raw()
        signature = self._identity().sign(_signed_text(self.site, session, public))
        return {"site": self.site, "public_key": public.hex(), "signature": signature.hex()}

    def shared_secrets(self, who: str, session: str, peers: dict[str, dict[str, str]],
                       pinned: dict[str, str]) -> dict[str, bytes]:
        """The pair secrets with every peer of the session (`peers`: site -> its relayed session
        key, this site's own included), each key checked against the identity pinned for it."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        own = self.session_key(who, session)
        if peers.get(self.site, {}).get("public_key") != own["public_key"]:
            raise PeerKeyRefused(f"the session's key for this site ({self.site}) is not the one this site handed out")
        private = self._session_private(who, session)
        shared = {}
        for peer, relayed in peers.items():
            if peer == self.site:
                continue
            if peer not in pinned:
                raise PeerKeyRefused(f"'{peer}' is not a peer this site knows ([secure_aggregation] peers)")
            try:
                public = bytes.fromhex(relayed["public_key"])
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(pinned[peer])).verify(
                    bytes.fromhex(relayed["signature"]), _signed_text(peer, session, public))
                shared[peer] = private.exchange(X25519PublicKey.from_public_bytes(public))
            except (InvalidSignature, KeyError, TypeError, ValueError):
                raise PeerKeyRefused(f"the session key relayed for '{peer}' is not signed by its pinned identity") from None
        return shared

    def _identity(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(_derive(self.seed, IDENTITY_INFO))

    def _session_private(self, who: str, session: str) -> X25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return X25519PrivateKey.from_private_bytes(_derive(self.seed, SESSION_INFO + who.encode() + b"|" + session.encode()))
