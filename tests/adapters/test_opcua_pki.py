"""The Part 12 PKI: trust by CA or by the certificate itself, validity, usage, URI, CRLs.

No server here: these check the decision on certificates made by a test CA. The same
decision against real servers (node-opcua, asyncua) is in tests/interop/test_node_opcua_pki.py
and test_opcua_source.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.sources.opcua import pki
from adapters.sources.opcua.security import thumbprint
from tests.fixtures.opcua_ca import Ca

URI = "urn:plc1:server"
EP = "opc.tcp://plc1:4840"


@pytest.fixture(scope="module")
def root() -> Ca:
    return Ca.root()


@pytest.fixture(scope="module")
def issuing(root: Ca) -> Ca:
    return root.intermediate()


def _pki(tmp_path: Path, **kw) -> pki.Pki:
    pki.ensure_layout(tmp_path / "pki")
    return pki.Pki(root=tmp_path / "pki", trust_hint=f"--pki {tmp_path / 'pki'}", **kw)


def _put(p: pki.Pki, folder: str, name: str, data: bytes) -> None:
    assert p.root is not None
    (p.root / folder / name).write_bytes(data)


def test_layout_has_the_part12_folders(tmp_path):
    pki.ensure_layout(tmp_path / "pki")
    for sub in ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl", "rejected"):
        assert (tmp_path / "pki" / sub).is_dir()


def test_trusted_through_its_root_ca_with_a_crl(tmp_path, root):
    p = _pki(tmp_path)
    leaf = root.server(URI)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "root.crl", root.crl())
    verdict = p.check(EP, [leaf.der], URI)
    assert verdict.chain[-1] == root.cert and "CA" in verdict.trusted_by
    assert verdict.warnings == []
    assert list((p.root / "rejected").iterdir()) == []


def test_intermediate_from_issuers_builds_the_chain_but_is_not_trusted_by_itself(
    tmp_path, root, issuing
):
    leaf = issuing.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.pem", root.pem)
    _put(p, "issuers/certs", "issuing.der", issuing.der)
    _put(p, "trusted/crl", "root.crl", root.crl())
    _put(p, "issuers/crl", "issuing.crl", issuing.crl())
    assert [c.subject for c in p.check(EP, [leaf.der], URI).chain] == [
        leaf.cert.subject,
        issuing.cert.subject,
        root.cert.subject,
    ]
    # the same CAs only in issuers/: a chain, but to nothing trusted
    q = _pki(tmp_path / "q")
    _put(q, "issuers/certs", "root.der", root.der)
    _put(q, "issuers/certs", "issuing.der", issuing.der)
    with pytest.raises(pki.UntrustedCertificate) as err:
        q.check(EP, [leaf.der], URI)
    assert "is not trusted" in str(err.value)


def test_intermediate_sent_by_the_server_completes_the_chain(tmp_path, root, issuing):
    leaf = issuing.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "root.crl", root.crl())
    _put(p, "issuers/crl", "issuing.crl", issuing.crl())
    blob = leaf.der + issuing.der
    assert len(p.check(EP, pki.split_chain(blob), URI).chain) == 3


def test_untrusted_lands_in_rejected_with_the_trust_command(tmp_path, root):
    other = Ca.root("Someone Else CA")
    leaf = other.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    with pytest.raises(pki.UntrustedCertificate) as err:
        p.check(EP, [leaf.der], URI)
    thumb = thumbprint(leaf.der)
    saved = p.root / "rejected" / f"{thumb}.der"
    assert saved.read_bytes() == leaf.der
    msg = str(err.value)
    assert f"edge-agent opcua trust --pki {p.root} {saved}" in msg
    assert msg.count("\n") == 0
    # trusted once the certificate itself is in trusted/certs (no CRL needed: no CA known)
    _put(p, "trusted/certs", "plc1.der", leaf.der)
    v = p.check(EP, [leaf.der], URI)
    assert "itself" in v.trusted_by and "revocation not checked" in v.warnings[0]


def test_revoked_by_its_ca_crl_is_refused(tmp_path, root):
    leaf = root.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "root.crl", root.crl([leaf.cert]))
    with pytest.raises(pki.CertificateRejected) as err:
        p.check(EP, [leaf.der], URI)
    assert "was revoked" in str(err.value) and "BadCertificateRevoked" in str(err.value)
    assert (p.root / "rejected" / f"{thumbprint(leaf.der)}.der").is_file()


def test_revoked_intermediate_revokes_what_it_signed(tmp_path, root, issuing):
    leaf = issuing.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "issuers/certs", "issuing.der", issuing.der)
    _put(p, "trusted/crl", "root.crl", root.crl([issuing.cert]))
    _put(p, "issuers/crl", "issuing.crl", issuing.crl())
    with pytest.raises(pki.CertificateRejected, match="its CA .* was revoked"):
        p.check(EP, [leaf.der], URI)


def test_crl_of_another_key_is_not_believed(tmp_path, root):
    """A CRL naming the CA but not signed by it (forged, or another CA's) counts for nothing:
    the status is unknown, not 'revoked' or 'fine'."""
    leaf = root.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "forged.crl", root.crl([leaf.cert], signer=Ca.root()))
    with pytest.raises(pki.CertificateRejected, match="BadCertificateRevocationUnknown"):
        p.check(EP, [leaf.der], URI)


def test_missing_crl_is_refused_unless_require_crl_is_off(tmp_path, root):
    leaf = root.server(URI)
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    with pytest.raises(pki.CertificateRejected) as err:
        p.check(EP, [leaf.der], URI)
    assert "require_crl = false" in str(err.value)
    lax = _pki(tmp_path, require_crl=False)
    assert "revocation status is unknown" in lax.check(EP, [leaf.der], URI).warnings[0]


def test_expired_and_not_yet_valid_are_refused_even_when_trusted(tmp_path, root):
    now = datetime.now(UTC)
    old = root.server(URI, not_before=now - timedelta(days=400), not_after=now - timedelta(days=2))
    early = root.server(URI, not_before=now + timedelta(days=2))
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "root.crl", root.crl())
    _put(p, "trusted/certs", "old.der", old.der)
    with pytest.raises(pki.CertificateRejected, match="expired on .*BadCertificateTimeInvalid"):
        p.check(EP, [old.der], URI)
    with pytest.raises(pki.CertificateRejected, match="not valid before"):
        p.check(EP, [early.der], URI)
    pinned = pki.Pki(pinned=thumbprint(old.der))
    with pytest.raises(pki.CertificateRejected, match="expired"):
        pinned.check(EP, [old.der], URI)


def test_application_uri_and_key_usage_are_checked(tmp_path, root):
    p = _pki(tmp_path)
    _put(p, "trusted/certs", "root.der", root.der)
    _put(p, "trusted/crl", "root.crl", root.crl())
    with pytest.raises(pki.CertificateRejected, match="BadCertificateUriInvalid"):
        p.check(EP, [root.server("urn:other:server").der], URI)
    with pytest.raises(pki.CertificateRejected, match="serverAuth"):
        p.check(EP, [root.server(URI, server_auth=False).der], URI)
    with pytest.raises(pki.CertificateRejected, match="key_encipherment"):
        p.check(EP, [root.server(URI, key_encipherment=False).der], URI)


def test_pinned_thumbprint_is_trusted_and_flat_folder_still_works(tmp_path, root):
    leaf = root.server(URI)
    assert pki.Pki(pinned=thumbprint(leaf.der), require_crl=False).check(EP, [leaf.der], URI)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "root.pem").write_bytes(root.pem)
    p = pki.Pki(extra_trusted=flat, rejected_dir=tmp_path / "rej", require_crl=False)
    assert p.check(EP, [leaf.der], URI).chain[-1] == root.cert


def test_split_chain_reads_a_leaf_and_its_cas(root, issuing):
    leaf = issuing.server(URI)
    assert pki.split_chain(leaf.der + issuing.der + root.der) == [leaf.der, issuing.der, root.der]
    assert pki.split_chain(leaf.der) == [leaf.der]
