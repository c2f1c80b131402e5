"""Data-scientist accounts from the site config: created once, never by self sign-up."""

from __future__ import annotations

from typing import Any

from datasite_setup.credentials import data_scientist_password
from datasite_setup.site_config import SiteConfig


def provision_accounts(config: SiteConfig, admin: Any) -> list[str]:
    """Create each configured data scientist's account if missing; return the e-mails created."""
    from syft.service.user.user_roles import ServiceRole

    existing = {user.email for user in admin.users.get_all()}
    created = []
    for ds in config.data_scientists:
        if ds.email in existing:
            continue
        admin.users.create(
            name=ds.name,
            email=ds.email,
            password=data_scientist_password(config, ds.email),
            password_verify=data_scientist_password(config, ds.email),
            institution=ds.institution,
            role=ServiceRole.DATA_SCIENTIST,
        )
        created.append(ds.email)
    return created
