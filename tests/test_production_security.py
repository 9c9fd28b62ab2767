"""Security through the real server: TLS, mutual TLS, bearer tokens; no pickle in the tree."""

from __future__ import annotations

import ast
import datetime
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_config
from tests.production_support import scrape, tiny_request, value

ROOT = Path(__file__).resolve().parents[1]


# ---- certificates ------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate from the CA
    and one from an unrelated CA, written as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _certificate("test CA", ca_key)
    rogue = _certificate("rogue CA", rogue_key)
    files: dict[str, bytes] = {"ca.pem": _pem(ca)}
    for name, issuer, kind in (
        ("server", (ca, ca_key), "server"),
        ("client", (ca, ca_key), "client"),
        ("rogue-client", (rogue, rogue_key), "client"),
    ):
        key = _key()
        certificate = _certificate(
            name, key, issuer, server=kind == "server", client=kind == "client"
        )
        files[f"{name}.pem"] = _pem(certificate)
        files[f"{name}.key"] = _pem_key(key)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def _tls_channel(address: str, pki: dict[str, Path], client: str | None = None) -> grpc.Channel:
    key = pki[f"{client}.key"].read_bytes() if client else None
    chain = pki[f"{client}.pem"].read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes(), key, chain)
    return grpc.secure_channel(address, credentials)


def _predict(channel: grpc.Channel, **kwargs: object) -> pb.PredictResponse:
    request = tiny_request(pb.METHOD_UNSPECIFIED)
    return pb_grpc.ExplainerStub(channel).Predict(
        pb.PredictRequest(model="tiny", input=request.input), timeout=10, **kwargs
    )


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# ---- TLS ---------------------------------------------------------------------------------


def test_tls_serves_encrypted_and_refuses_plaintext(repository: Path, pki: dict[str, Path]) -> None:
    running = RunningServer(
        make_config(repository, tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    ).start()
    try:
        with _tls_channel(running.address, pki) as channel:
            assert len(_predict(channel).predictions) == 1
        with grpc.insecure_channel(running.address) as plain:
            assert _refused(lambda: _predict(plain)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    repository: Path, pki: dict[str, Path]
) -> None:
    running = RunningServer(
        make_config(
            repository,
            tls_cert=str(pki["server.pem"]),
            tls_key=str(pki["server.key"]),
            tls_client_ca=str(pki["ca.pem"]),
        )
    ).start()
    try:
        with _tls_channel(running.address, pki, client="client") as channel:
            assert len(_predict(channel).predictions) == 1
        for client in (None, "rogue-client"):
            with _tls_channel(running.address, pki, client=client) as channel:
                assert _refused(lambda c=channel: _predict(c)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_incomplete_tls_configuration_is_refused(repository: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        make_config(repository, tls_cert="server.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        make_config(repository, tls_client_ca="ca.pem")


# ---- bearer tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    token_file = tmp_path_factory.mktemp("secrets") / "tokens"
    token_file.write_text("rotated-token-1\n\nrotated-token-2\n")
    running = RunningServer(
        make_config(repository, auth_token="s3cret-token", auth_token_file=str(token_file))
    ).start()
    yield running
    running.stop()


def test_bearer_token_is_required_except_for_health(guarded: RunningServer) -> None:
    before = value(
        scrape(guarded.server.metrics_port), "saliency_rejected_total", reason="unauthenticated"
    )
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        explain = tiny_request(pb.METHOD_VANILLA_GRADIENT)
        calls = {
            "Explain": lambda md: stub.Explain(explain, timeout=10, metadata=md),
            "ExplainStream": lambda md: list(stub.ExplainStream(explain, timeout=10, metadata=md)),
            "ListModels": lambda md: stub.ListModels(
                pb.ListModelsRequest(), timeout=10, metadata=md
            ),
            "GetModel": lambda md: stub.GetModel(
                pb.GetModelRequest(model="tiny"), timeout=10, metadata=md
            ),
        }
        wrong = (
            (),
            (("authorization", "Bearer nope"),),
            (("authorization", "s3cret-token"),),
            (("authorization", "Basic s3cret-token"),),
        )
        for name, call in calls.items():
            for metadata in wrong:
                error = _refused(lambda c=call, m=metadata: c(m))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                assert "Bearer" in error.details()
        for token in ("s3cret-token", "rotated-token-1", "rotated-token-2"):
            for call in calls.values():
                call((("authorization", f"Bearer {token}"),))
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "saliency.v1.Explainer"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
    after = value(
        scrape(guarded.server.metrics_port), "saliency_rejected_total", reason="unauthenticated"
    )
    assert after - before == len(calls) * len(wrong)


# ---- no pickle ---------------------------------------------------------------------------

_PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "joblib", "cloudpickle"}


def _python_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unpickling_calls(source: str, where: str) -> list[str]:
    """Pickle-family imports, ``torch.load`` without ``weights_only=True``,
    ``allow_pickle=True`` and loaders that unpickle, in one file's source."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            names = set()
        if names & _PICKLING_MODULES:
            problems.append(f"{where}:{node.lineno} imports {sorted(names)}")
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        if called.endswith("torch.load") and not _keyword_is_true(node, "weights_only"):
            problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
        if _keyword_is_true(node, "allow_pickle"):
            problems.append(f"{where}:{node.lineno} {called}(allow_pickle=True)")
        if called.endswith(("torch.jit.load", "torch.package.PackageImporter")):
            problems.append(f"{where}:{node.lineno} {called} (may unpickle)")
    return problems


def test_the_pickle_scan_finds_what_it_looks_for() -> None:
    source = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\n"
        "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
        "torch.load('m.pt', weights_only=True)\nnp.load('a.npy', allow_pickle=True)\n"
    )
    assert len(unpickling_calls(source, "x.py")) == 5


def test_no_pickle_anywhere_in_the_source_tree() -> None:
    """Loading never unpickles: the scan above finds nothing in any Python file of the
    tree, and no pickle-format files are tracked."""
    files = _python_files()
    assert len(files) > 20
    problems: list[str] = []
    for path in files:
        problems += unpickling_calls(path.read_text(), str(path.relative_to(ROOT)))
    tracked = subprocess.run(
        ["git", "ls-files", "*.pkl", "*.pickle", "*.pth", "*.pt", "*.ckpt", "*.joblib"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    problems += [f"{name}: pickle-format file tracked" for name in tracked]
    assert not problems, "\n".join(problems)
