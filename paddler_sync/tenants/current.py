"""The tenants in force: the one owner of the tenants book, replaced whole on a reload (SIGHUP, or
``PUT /api/v1/tenants``) and kept as it was when the new file is wrong (the error names its line)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from paddler_sync.tenants.book import TenantBook, TenantsError, load_tenants, parse_tenants

logger = logging.getLogger("paddler_sync.tenants")


class CurrentTenants:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.book: TenantBook | None = load_tenants(path) if path else None

    @property
    def enabled(self) -> bool:
        return self.book is not None

    def names(self) -> list[str]:
        return list(self.book.tenants) if self.book is not None else []

    def reload(self) -> TenantBook | None:
        """The file again; on an error the running tenants stay, and the log says what is wrong where."""
        if self.path is None:
            return None
        try:
            self.book = load_tenants(self.path)
        except TenantsError as exc:
            logger.error("tenants not reloaded, the running ones stay: %s", exc)
            return None
        logger.info("tenants reloaded from %s: %s", self.path, ", ".join(self.book.tenants))
        return self.book

    def replace(self, text: str) -> TenantBook:
        """New tenants from the API: checked, written over the file (atomically: a crash leaves the old or the new
        one), then in force. Raises TenantsError, changing nothing, when the text is wrong."""
        if self.path is None:
            raise TenantsError("this balancer runs without tenants: start it with --tenants PATH (PADDLER_TENANTS)")
        book = parse_tenants(text, "the tenants sent")
        target = Path(self.path)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, delete=False,
                                         prefix=f".{target.name}.") as temporary:
            temporary.write(text)
        os.replace(temporary.name, target)
        self.book = TenantBook(book.tenants, str(target))
        logger.info("tenants replaced through the API and written to %s: %s", target, ", ".join(book.tenants))
        return self.book
