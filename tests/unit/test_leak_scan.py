"""The leak scan itself (tests/leak_scan.py) finds what it claims to, and only that.

Cases:
- a secret planted in a temporary log in each form (raw, JSON-escaped by Python and by Go, twice escaped,
  ``quote_plus``/``quote`` in both hex cases, base64 and base64url at each alignment inside a larger blob, also of
  the form-encoded value, ``Basic base64(id:secret)``) is found, and named by that form;
- any 8-character infix of a long secret is found; an infix of a short one, a 7-character piece, public
  structure (a prefix a secret shares with public strings, a JWT's header, digits, a UUID or a fingerprint that
  happens to hold a hex infix, a word of a public text) is not;
- the base64 cores are exactly the characters that depend on the secret alone;
- the ``runs_last`` ordering puts the marked tests behind all others.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
import uuid
from pathlib import Path

import jwt
import pytest

from tests import leak_scan
from tests.conftest import runs_last_at_the_end

CLIENT_ID = "client-1a2b3c4d"
SECRET = "s3cr3t:0f1e2d3c4b5a69788796a5b4c3d2e1f0&+%<x>\"q\\"


def _scan_log(tmp_path: Path, line: str, secrets: set[str] | None = None) -> list[leak_scan.Finding]:
    log = tmp_path / "operator.log"
    log.write_text(f"2026-01-01T00:00:00Z [INFO] secured_endpoint: {line}\nanother line\n")
    found = leak_scan.needles(secrets or {SECRET}, client_ids={SECRET: CLIENT_ID})
    return leak_scan.scan({"planted log": log.read_text()}, found)


def _blob(prefix: bytes, value: str) -> str:
    return base64.b64encode(prefix + value.encode() + b"tail").decode()


PLANTED = {
    "raw": f"body={SECRET} end",
    "JSON-escaped": json.dumps({"client_secret": SECRET}),
    "JSON-escaped (Go)": json.dumps({"message": SECRET}, ensure_ascii=False).replace("&", "\\u0026")
    .replace("<", "\\u003c").replace(">", "\\u003e"),
    "JSON-escaped twice": json.dumps({"line": json.dumps({"client_secret": SECRET})}),
    "quote_plus": "grant_type=client_credentials&client_secret=" + urllib.parse.quote_plus(SECRET),
    "quote_plus (lower-case hex)": "x=" + urllib.parse.quote_plus(SECRET).lower(),
    "base64@0": _blob(b"", SECRET),
    "base64@1": _blob(b"a", SECRET),
    "base64@2": _blob(b"ab", SECRET),
    "base64url@0": _blob(b"", SECRET).replace("+", "-").replace("/", "_"),  # its core has a "+"
    "base64@1 of quote_plus": _blob(b"{", urllib.parse.quote_plus(SECRET)),
    "Basic base64(id:secret)": "Authorization: Basic "
    + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode(),
}


@pytest.mark.parametrize(("form", "line"), PLANTED.items(), ids=PLANTED.keys())
def test_each_form_planted_in_a_log_is_found(tmp_path: Path, form: str, line: str) -> None:
    findings = _scan_log(tmp_path, line)
    assert len(findings) == 1, findings
    (finding,) = findings
    assert finding.source == "planted log"
    assert finding.form.startswith(form) or finding.form == form, finding
    assert "s3cr3t" in finding.secret


def test_basic_of_any_client_id_is_found_through_the_aligned_base64(tmp_path: Path) -> None:
    header = base64.b64encode(f"someone-else:{SECRET}".encode()).decode()
    [finding] = _scan_log(tmp_path, f"Authorization: Basic {header}")
    assert finding.form.startswith("base64@")


@pytest.mark.parametrize("start", [0, 1, 7, 20, 36])
def test_any_infix_of_a_long_secret_is_found(tmp_path: Path, start: int) -> None:
    secret = "tok-0f1e2d3c4b5a69788796a5b4c3d2e1f0deadbeef"  # 44 characters, no infix of digits only
    piece = secret[start:start + leak_scan.INFIX]
    findings = _scan_log(tmp_path, f"token starts with {piece}…", {secret})
    assert [finding.form for finding in findings] == ["infix of raw"]


def test_a_base64_infix_is_found(tmp_path: Path) -> None:
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    piece = leak_scan.base64_cores(secret.encode())[1][10:10 + leak_scan.INFIX]
    [finding] = _scan_log(tmp_path, f"blob …{piece}…", {secret})
    assert finding.form == "infix of base64@1"


def test_what_is_not_a_leak_is_not_reported(tmp_path: Path) -> None:
    long_one = f"s3cr3t:{uuid.uuid4().hex}&+%"
    other = f"s3cr3t:{uuid.uuid4().hex}&+%"
    short = "pw-1234567"  # shorter than MIN_INFIX_SECRET: looked for whole only
    token = jwt.encode({"sub": "x", "jti": uuid.uuid4().hex}, "k" * 32, algorithm="HS256")
    hex_secret = uuid.uuid4().hex
    text = " ".join([
        long_one[:7] + "deadbeef",  # the shared prefix (public structure) with something else
        long_one[7:14],  # 7 characters only
        short[:8],  # an infix of a short secret
        token.split(".")[0],  # a JWT's header: public
        "resourceVersion 1234567890123",
        f"uid {hex_secret[:8]}-{hex_secret[8:12]}-4{hex_secret[13:16]}-8{hex_secret[17:20]}-{hex_secret[20:]}",
        f"fingerprint sha256:{hex_secret[:12]}",
        "endpoint labelled, Secret labelled-token",  # the words of a literal "secret" of a test
    ])
    log = tmp_path / "operator.log"
    log.write_text(text)
    found = leak_scan.needles({long_one, other, short, token, hex_secret, "1234567890123456", "labelled-secret"},
                              public_texts=['add_client(client_id, "labelled-secret")'])
    assert leak_scan.scan({"log": log.read_text()}, found) == []
    assert leak_scan.scan({"log": "the secret: labelled-secret"}, found), "found whole all the same"


def test_secrets_that_contain_one_another_do_not_hide_each_other(tmp_path: Path) -> None:
    value = f"pa55:{uuid.uuid4().hex}"
    [finding] = _scan_log(tmp_path, f"read {value[5:20]}", {value, value + "\n"})
    assert finding.form == "infix of raw"


def test_a_short_secret_is_found_whole(tmp_path: Path) -> None:
    [finding] = _scan_log(tmp_path, "password=hunter2 ok", {"hunter2"})
    assert finding.form == "raw"


@pytest.mark.parametrize("length", range(1, 10))
def test_base64_cores_are_the_characters_of_the_value_alone(length: int) -> None:
    """Whatever surrounds the value, its core at that alignment is in the blob; one more character at either end
    would not always be."""
    value = bytes(range(200, 200 + length))
    for offset, core in leak_scan.base64_cores(value).items():
        blobs = [base64.b64encode(bytes([fill]) * (3 + offset) + value + bytes([fill]) * after).decode()
                 for fill in (0x00, 0xFF) for after in range(3)]
        assert all(core in blob for blob in blobs), offset
        start, end = (0, 2, 3)[offset], (4 * ((offset + length) // 3) + (0, 1, 2)[(offset + length) % 3])
        assert len(core) == end - start
        whole = base64.b64encode(bytes(3 + offset) + value).decode()
        assert whole[4 + start:4 + end] == core


class _Item:
    def __init__(self, name: str, *, last: bool = False) -> None:
        self.name, self.last = name, last

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self.last and name == "runs_last" else None


def test_runs_last_goes_behind_every_other_test() -> None:
    items = [_Item("a"), _Item("scan", last=True), _Item("b"), _Item("c")]
    runs_last_at_the_end(items)  # type: ignore[arg-type]
    assert [item.name for item in items] == ["a", "b", "c", "scan"]
