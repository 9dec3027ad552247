"""The check at start of the private library parts the proxy leans on: quiet on the releases installed here, and a
missing part or an unverified release named with the release to install."""

from __future__ import annotations

import pytest

from paddler_sync import library_checks
from paddler_sync.library_checks import VERIFIED, installed, problems


def test_the_installed_releases_are_verified_and_have_every_private_part() -> None:
    assert problems() == ([], [])
    for distribution, (low, high) in VERIFIED.items():
        assert int(low.split(".")[0]) <= int(installed(distribution).split(".")[0]) < int(high)


def test_a_missing_private_part_is_an_error_naming_the_release_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib3.connectionpool import HTTPConnectionPool

    monkeypatch.delattr(HTTPConnectionPool, "_get_conn")
    errors, warnings = problems()
    assert errors == [f"urllib3 {installed('urllib3')} lacks HTTPConnectionPool._get_conn, _put_conn and _new_conn, "
                      f"which paddler_sync relies on: install a verified release: pip install 'urllib3>=2.0,<3'"]
    assert warnings == []


def test_an_optional_part_missing_and_an_unverified_release_are_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.http.wsgi import Response

    monkeypatch.delattr(Response, "_emit_body")
    monkeypatch.setattr(library_checks, "installed", lambda d: "99.0" if d == "redis" else installed(d))
    errors, warnings = problems()
    assert errors == []
    assert any(w.startswith("gunicorn ") and "slower path" in w for w in warnings)
    assert any(w.startswith("redis 99.0 is outside") and "pip install 'redis>=5.0,<9'" in w for w in warnings)
