"""Config of the mes_http source: the sample validates, security rules refuse bad setups
with one line naming the key and the fix (through the real config loader)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from adapters.sources.mes_http import Config
from agent.config import parse_config
from agent.errors import ConfigError

SAMPLE = Path(__file__).parents[2] / "adapters/sources/mes_http/sample.toml"


def load(sources: dict[str, Any]) -> Any:
    raw = {"sinks": {"https": {"url": "https://gateway.example/ingest"}}, "sources": sources}
    return parse_config(raw)


def test_sample_validates_as_shipped():
    raw = tomllib.loads(SAMPLE.read_text())
    cfg = load(raw["sources"])
    assert isinstance(cfg.sources["mes"], Config)
    assert cfg.sources["mes"].listen == "127.0.0.1:8080"


def test_sample_with_every_key_uncommented_validates(tmp_path):
    """Each documented key is real: uncomment all of them (files pointed at temp files)."""
    text = re.sub(r"^# ", "", SAMPLE.read_text(), flags=re.M)
    for name in ("mes-token", "mes-cert.pem", "mes-key.pem"):
        (tmp_path / name).write_text("x\n")
        text = text.replace(f"/etc/edge-agent/{name}", str(tmp_path / name))
    raw = tomllib.loads(text)
    cfg = load(raw["sources"]).sources["mes"]
    assert cfg.mapping is not None and cfg.mapping.fields["Unit"] == "data.good.uom"
    assert cfg.max_body_bytes == 1 << 20 and cfg.retry_after == 5.0
    assert cfg.extra_uom_codes == ["KTM"]


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "10.1.2.3:80", "[::]:8080", "plant-srv:8080"])
def test_non_loopback_listen_without_token_is_refused(listen):
    with pytest.raises(ConfigError) as err:
        load({"mes": {"type": "mes_http", "listen": listen}})
    msg = str(err.value)
    assert msg.startswith("sources.mes.token: required when listen is not a loopback address")
    assert listen in msg and "\n" not in msg


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "localhost:9000", "[::1]:8080"])
def test_loopback_listen_needs_no_token(listen):
    assert load({"mes": {"type": "mes_http", "listen": listen}}).sources["mes"].token is None


def test_non_loopback_listen_with_token_file(tmp_path):
    f = tmp_path / "tok"
    f.write_text("t0ken\n")
    cfg = load({"mes": {"type": "mes_http", "listen": "0.0.0.0:8080", "token_file": str(f)}})
    assert cfg.sources["mes"].token_file == f
    assert "t0ken" not in repr(cfg)


def test_token_is_secret_in_repr():
    cfg = load({"mes": {"type": "mes_http", "listen": "0.0.0.0:1", "token": "hunter2hunter2"}})
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.sources["mes"])


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        ({"listen": "8080"}, "sources.mes.listen", "HOST:PORT"),
        ({"listen": "127.0.0.1:99999"}, "sources.mes.listen", "HOST:PORT"),
        ({"tls_cert": "/nonexistent/cert.pem"}, "sources.mes.tls_cert", "no such file"),
        ({"max_body_bytes": "lots"}, "sources.mes.max_body_bytes", "not a size"),
        ({"retry_after": "soon"}, "sources.mes.retry_after", "not a duration"),
        ({"extra_uom_codes": ["kilo"]}, "sources.mes.extra_uom_codes", "rec. 20"),
        ({"mapping": {"fields": {"Qty": "quantity"}}}, "sources.mes.mapping.fields", "data."),
        (
            {"mapping": {"constants": {"type": "mfg.nope"}}},
            "sources.mes.mapping.constants",
            "not a canonical MES event type",
        ),
        ({"lisen": "127.0.0.1:1"}, "sources.mes.lisen", "unknown key"),
        ({"token": "a", "token_file": "/etc/hostname"}, "sources.mes.token", "not both"),
    ],
)
def test_bad_values_name_the_key(body, path, words):
    with pytest.raises(ConfigError) as err:
        load({"mes": {"type": "mes_http", **body}})
    assert str(err.value).startswith(path + ":"), str(err.value)
    assert words in str(err.value)


def test_tls_needs_both_files(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"^sources\.mes\.tls_key: required"):
        load({"mes": {"type": "mes_http", "tls_cert": str(cert)}})
