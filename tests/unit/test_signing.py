"""Signed download URLs: HMAC over path and expiry; tampering and expiry are refused."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from jobcell.home import open_home
from jobcell.server.signing import KEY_FILE, UrlSigner, load_signing_key

PATH = "/api/v1/files/job-1/step a/out/result file.txt"


def parts(url: str) -> tuple[str, str, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return unquote(split.path), query["expires"][0], query["sig"][0]


def test_a_signed_url_checks_until_it_expires() -> None:
    signer = UrlSigner(b"k" * 32, ttl_s=60)
    url, expires = signer.sign(PATH, now=1000.0)
    path, when, sig = parts(url)
    assert (path, int(when), expires) == (PATH, 1060, 1060)
    assert signer.check(path, when, sig, now=1059.0) is None
    assert "expired" in (signer.check(path, when, sig, now=1061.0) or "")


def test_tampering_with_path_expiry_or_signature_is_refused() -> None:
    signer = UrlSigner(b"k" * 32, ttl_s=60)
    path, when, sig = parts(signer.sign(PATH, now=1000.0)[0])
    assert "does not match" in (signer.check(path + "x", when, sig, now=1000) or "")
    assert "does not match" in (signer.check(path, str(int(when) + 3600), sig, now=1000) or "")
    assert "does not match" in (signer.check(path, when, sig[:-1] + "0", now=1000) or "")
    assert "not a number" in (signer.check(path, "soon", sig, now=1000) or "")
    assert "not signed" in (signer.check(path, None, None, now=1000) or "")
    other = UrlSigner(b"o" * 32, ttl_s=60)
    assert "does not match" in (other.check(path, when, sig, now=1000) or "")


def test_the_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    home = open_home(tmp_path / "cell")
    key = load_signing_key(home)
    assert len(key) == 32
    mode = stat.S_IMODE((home.locks / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert load_signing_key(home) == key
    assert not [p for p in home.locks.iterdir() if p.name.startswith(f".{KEY_FILE}")]
