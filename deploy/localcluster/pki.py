"""Keys and certificates of the local cluster, made at its first start.

One CA signs a serving certificate for 127.0.0.1 and the real node's address (the API server,
Kueue's webhooks and the kubelets of the kwok nodes and of the real node all serve it) and an
admin client certificate (the API server shows it to the kubelets). The service-account key
pair signs ServiceAccount tokens. The bearer tokens of the admin and of the real node's kubelet
are in the API server's token file and in their kubeconfigs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.localcluster.addresses import NODE_IP, NODE_NAME, SERVICE_IP

SERVING_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
VALID_FOR = dt.timedelta(days=365)


@dataclass(frozen=True)
class Pki:
    folder: Path

    ca = property(lambda self: self.folder / "ca.crt")
    serving_cert = property(lambda self: self.folder / "serving.crt")
    serving_key = property(lambda self: self.folder / "serving.key")
    client_cert = property(lambda self: self.folder / "admin.crt")
    client_key = property(lambda self: self.folder / "admin.key")
    sa_key = property(lambda self: self.folder / "sa.key")
    sa_pub = property(lambda self: self.folder / "sa.pub")
    token_file = property(lambda self: self.folder / "tokens.csv")

    @property
    def token(self) -> str:
        return self._tokens()[0]

    @property
    def node_token(self) -> str:
        """The real node's kubelet: system:node:<name> in system:nodes (the Node authorizer)."""
        return self._tokens()[1]

    def _tokens(self) -> list[str]:
        return [line.split(",", 1)[0] for line in self.token_file.read_text().splitlines()]


def make(folder: Path) -> Pki:
    """Write every key and certificate into ``folder`` (kept if already there)."""
    pki = Pki(folder)
    if pki.token_file.exists():
        return pki
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "finetune-job local cluster CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(pki.ca, ca.public_bytes(serialization.Encoding.PEM))
    sans = [x509.DNSName(n) for n in SERVING_NAMES] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", SERVICE_IP, NODE_IP)
    ]
    _leaf(
        pki.serving_cert,
        pki.serving_key,
        ca,
        ca_key,
        "127.0.0.1",
        None,
        sans,
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _leaf(
        pki.client_cert,
        pki.client_key,
        ca,
        ca_key,
        "admin",
        "system:masters",
        [],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write(pki.sa_key, _pem_key(sa), private=True)
    pub = sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(pki.sa_pub, pub)
    # token,user,uid,"group": the admin, then the real node's kubelet.
    tokens = (
        f'{secrets.token_hex(24)},admin,admin,"system:masters"\n'
        f'{secrets.token_hex(24)},system:node:{NODE_NAME},{NODE_NAME},"system:nodes"\n'
    )
    _write(pki.token_file, tokens.encode(), private=True)
    return pki


def _leaf(cert_path, key_path, ca, ca_key, cn, org, sans, usage) -> None:  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    builder = (
        _builder(x509.Name(attrs), ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write(
        cert_path, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    _write(key_path, _pem_key(key), private=True)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)
