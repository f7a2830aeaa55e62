"""C2PA content credentials (the ``c2pa-python`` package): sign a written file with a manifest that says it
was made by a trained model (a ``c2pa.created`` action, digital source type ``trainedAlgorithmicMedia``),
naming the models and the workflow's hash; read a file's manifest back as valid / tampered / absent.

Signing needs a certificate chain and its private key (ES256, P-256). The user's comes as one PEM file holding
both; without one, a local chain (a CA and a signer certificate) is generated on first use into the user's
config folder, and the manifest and the log say so: such a signer is valid but trusted by no C2PA trust list.
"""
from __future__ import annotations

import datetime
import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG_DIR_ENV = "SPACETIME_CONFIG_DIR"
LOCAL_SIGNER_FILE = "c2pa_local_signer.pem"
LOCAL_SIGNER_NOTE = ("signed with a local self-signed certificate generated on first use by ComfyUI-Spacetime; "
                     "it proves the file is unchanged since signing, not who signed it")
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CLAIM_GENERATOR = "ComfyUI-Spacetime"
ASSERTION_LABEL = "org.comfyui-spacetime.generation"
# what c2pa-rs can embed a manifest into, by file suffix (it has no Matroska/WebM handler)
MIME_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".webp": "image/webp"}
# a validation failure that only says the signer is on no trust list: the local certificate always has it
UNTRUSTED = "signingCredential.untrusted"


def available() -> bool:
    return importlib.util.find_spec("c2pa") is not None and importlib.util.find_spec("cryptography") is not None


def config_dir() -> Path:
    """``$SPACETIME_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/comfyui-spacetime`` (``~/.config/comfyui-spacetime``)."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "comfyui-spacetime"


@dataclass(frozen=True)
class SigningIdentity:
    """A PEM certificate chain (signer first) and its PEM private key; ``local``: our generated chain."""

    chain_pem: bytes
    key_pem: bytes
    local: bool


def load_identity(certificate: str = "") -> SigningIdentity:
    """The user's PEM file (certificate chain and private key in one file), or, for "", the local chain,
    generated on first use. A file that is missing or does not parse is a one-line ValueError."""
    if certificate:
        path = Path(certificate).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"certificate={certificate!r}: cannot read it ({exc.strerror}); allowed: a PEM file holding "
                             "the signing certificate chain and its private key, or empty for the local certificate") from exc
        return _parse_identity(data, f"certificate={certificate!r}", local=False)
    path = config_dir() / LOCAL_SIGNER_FILE
    if not path.is_file():
        _write_atomic(path, _generate_local_chain())
        log.warning("C2PA: generated a local self-signed signing certificate at %s; files are signed with it "
                    "(valid, but on no trust list). Give a certificate file to sign as yourself.", path)
    return _parse_identity(path.read_bytes(), f"local certificate {path}", local=True)


def _parse_identity(data: bytes, what: str, local: bool) -> SigningIdentity:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    allowed = "allowed: a PEM file holding an ES256 (P-256) certificate chain, signer first, and its private key"
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{what}: holds no certificate that parses ({exc}); {allowed}") from None
    key_blocks = [block for block in _pem_blocks(data) if b"PRIVATE KEY" in block.split(b"\n", 1)[0]]
    if not key_blocks:
        raise ValueError(f"{what}: holds no private key; {allowed}")
    try:
        key = serialization.load_pem_private_key(key_blocks[0], password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: its private key does not parse ({exc}); {allowed}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{what}: the private key is not a P-256 elliptic-curve key; {allowed}")
    if certificates[0].public_key() != key.public_key():
        raise ValueError(f"{what}: the first certificate does not belong to the private key; {allowed}")
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return SigningIdentity(chain, key_pem, local)


def _pem_blocks(data: bytes) -> list[bytes]:
    blocks, current = [], None
    for line in data.splitlines(keepends=True):
        if line.startswith(b"-----BEGIN"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith(b"-----END"):
                blocks.append(b"".join(current))
                current = None
    return blocks


def _generate_local_chain() -> bytes:
    """A local CA and an ES256 signer certificate it issued (the shape of C2PA's certificate profile: a signer that is no CA, issued by one), as
    one PEM: signer certificate, CA certificate, signer key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ComfyUI-Spacetime (local, self-signed)")])

    def usage(**flags) -> x509.KeyUsage:
        names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{n: flags.get(n, False) for n in names})

    ca_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Spacetime local CA")).issuer_name(name("Spacetime local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    signer = (x509.CertificateBuilder().subject_name(name("Spacetime local signer")).issuer_name(ca.subject)
              .public_key(signer_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(digital_signature=True), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key = signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return signer.public_bytes(pem) + ca.public_bytes(pem) + key


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a private key: the owner only
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def manifest(title: str, models: tuple[str, ...], workflow_sha256: str, watermarked: bool, local: bool) -> dict:
    """The manifest definition signed into a file."""
    parameters = {"models": list(models), "workflow_sha256": workflow_sha256}
    generation = {**parameters, "invisible_watermark": watermarked,
                  "signer": LOCAL_SIGNER_NOTE if local else "a certificate given by the user"}
    return {
        "claim_generator_info": [{"name": CLAIM_GENERATOR, "version": "0.1.0"}],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": CLAIM_GENERATOR}, "parameters": parameters}]}},
            {"label": ASSERTION_LABEL, "data": generation},
        ],
    }


def sign_file(path: Path, mime: str, definition: dict, identity: SigningIdentity) -> None:
    """Embed a signed manifest into the file at ``path`` (of a MIME type of ``MIME_TYPES``), atomically."""
    import c2pa

    tmp = path.with_name(f"{path.name}.signed")
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", identity.chain_pem, identity.key_pem, None))
        with c2pa.Builder(definition) as builder, open(path, "rb") as source, open(tmp, "w+b") as dest:
            builder.sign(signer, mime, source, dest)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ManifestReport:
    """``state``: "valid", "tampered", "absent" or "unsupported" (a format C2PA cannot hold); ``detail``: one line."""

    state: str
    detail: str
    manifest: dict | None = None


def read_manifest(path: Path) -> ManifestReport:
    import c2pa

    mime = MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        return ManifestReport("unsupported", f"C2PA cannot embed a manifest in {path.suffix} files")
    try:
        with open(path, "rb") as file:
            data = file.read()
        with c2pa.Reader(mime, io.BytesIO(data)) as reader:
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
            active = reader.get_active_manifest()
    except c2pa.C2paError as exc:
        text = str(exc)
        if type(exc).__name__.endswith("ManifestNotFound"):
            return ManifestReport("absent", "no C2PA manifest")
        return ManifestReport("tampered", f"the manifest does not verify: {text}")
    failures = [item.get("code", "") for item in results.get("activeManifest", {}).get("failure", [])]
    real = [code for code in failures if code != UNTRUSTED]
    if state == "Invalid" or real:
        return ManifestReport("tampered", f"the manifest does not verify ({', '.join(real) or state})", active)
    signer = (active or {}).get("signature_info", {}).get("common_name", "?")
    trust = "untrusted signer (on no C2PA trust list)" if UNTRUSTED in failures else "trusted signer"
    return ManifestReport("valid", f"signed by {signer!r}, {trust}", active)


def generation_of(report: ManifestReport) -> dict | None:
    """Our generation assertion of a read manifest (models, workflow hash, signer note), or None."""
    for assertion in (report.manifest or {}).get("assertions", []):
        if assertion.get("label") == ASSERTION_LABEL:
            return assertion.get("data")
    return None


def workflow_hash(workflow) -> str:
    """sha256 of a workflow (or prompt) as canonical JSON."""
    import hashlib

    return hashlib.sha256(json.dumps(workflow, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
