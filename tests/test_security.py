"""Authentication on every method of every service, rate limits, TLS and mutual TLS with a CA made in the test."""

import asyncio
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.pb.certkv.v1 import inference_pb2 as pb
from server.security import HEALTH_METHODS, SecurityConfig
from tests.serving import greedy, running_server

TOKEN = "s3cret-token-for-tests-0123456789"
OTHER = "another-tenants-token-9876543210"
KEYS = (("tenant-a", TOKEN), ("tenant-b", OTHER))


def registered_methods(server) -> dict[str, tuple[bool, bool, bytes]]:
    """Every method of every service on the server: path -> (request streaming, response streaming, a request)."""
    from grpc_health.v1 import health_pb2 as h
    requests = {"Generate": greedy([5, 6], 1), "Tokenize": pb.TokenizeRequest(text="x"),
                "GetModelInfo": pb.GetModelInfoRequest(), "Check": h.HealthCheckRequest(),
                "Watch": h.HealthCheckRequest(), "List": h.HealthListRequest(), "ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(
                    list_services="")}
    methods = {}
    for descriptor in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = (
                    method.client_streaming, method.server_streaming, requests[method.name].SerializeToString())
    return methods


async def call(channel, path, shape, metadata, timeout=5.0):
    """Calls any method with raw bytes; returns the status code."""
    client_streaming, server_streaming, payload = shape
    try:
        if client_streaming or server_streaming:
            responses = (channel.stream_stream(path)(iter([payload]), metadata=metadata, timeout=timeout)
                         if client_streaming else channel.unary_stream(path)(payload, metadata=metadata,
                                                                             timeout=timeout))
            async for _ in responses:
                break
            responses.cancel()  # a stream left open (a health Watch) would count against the peer's cap
        else:
            await channel.unary_unary(path)(payload, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


BAD_AUTH = [
    (),
    (("authorization", "Bearer wrong-token-wrong-token"),),
    (("x-api-key", TOKEN),),
    (("authorization", f"Bearer  {TOKEN}"),),
    (("authorization", f" Bearer {TOKEN} x"),),
    (("authorization", "Bearer wrong-token-wrong-token"), ("authorization", f"Bearer {TOKEN}")),
    (("authorization", ""),),
]


@pytest.fixture(scope="module")
async def guarded(tiny_llama):
    security = SecurityConfig(api_keys=KEYS)
    async with running_server(tiny_llama, server_overrides={"security": security}) as server:
        yield server


async def test_every_method_needs_a_token_except_health(guarded):
    methods = registered_methods(guarded)
    assert len(methods) == 7  # a new RPC fails this test until someone decides its authentication
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        for path, shape in methods.items():
            for metadata in BAD_AUTH:
                code = await call(channel, path, shape, metadata)
                expected = grpc.StatusCode.OK if path in HEALTH_METHODS else grpc.StatusCode.UNAUTHENTICATED
                assert code == expected, (path, metadata, code)
            for token in (TOKEN, OTHER):
                good = (("authorization", f"bearer {token}"),)  # the scheme is case-insensitive
                assert await call(channel, path, shape, good) == grpc.StatusCode.OK, path  # List is implemented
    assert set(HEALTH_METHODS) < set(methods)


async def test_refused_calls_start_no_engine_work(guarded):
    before = guarded.engine.scheduler.num_preemptions, guarded.engine.has_unfinished()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        codes = await asyncio.gather(*(call(channel, "/certkv.v1.Inference/Generate",
                                            (False, True, greedy([5] * 50, 200).SerializeToString()), ())
                                       for _ in range(10)))
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert not guarded.engine.has_unfinished() and before[0] == guarded.engine.scheduler.num_preemptions


async def test_rate_limit_per_tenant(tiny_llama):
    security = SecurityConfig(api_keys=KEYS, rate_limit=5.0, rate_burst=5)
    async with running_server(tiny_llama, server_overrides={"security": security}) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tokenize = channel.unary_unary("/certkv.v1.Inference/Tokenize")
            payload = pb.TokenizeRequest(text="x").SerializeToString()

            async def one(token):
                try:
                    await tokenize(payload, metadata=(("authorization", f"Bearer {token}"),), timeout=5)
                    return "ok", None
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), dict(exc.trailing_metadata() or ()).get("retry-after-ms")

            a = await asyncio.gather(*(one(TOKEN) for _ in range(20)))
            b = await asyncio.gather(*(one(OTHER) for _ in range(2)))
            check = await channel.unary_unary("/grpc.health.v1.Health/Check")(
                health_pb2.HealthCheckRequest().SerializeToString(), timeout=5)
    limited = [hint for code, hint in a if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert sum(code == "ok" for code, _ in a) in (5, 6) and len(limited) >= 14 and all(int(h) > 0 for h in limited)
    assert [code for code, _ in b] == ["ok", "ok"] and check


async def test_rate_limit_without_auth_is_per_peer_address(tiny_llama):
    """The docstring promised a bucket per peer address; the code had one global bucket, so one client's burst
    refused everyone. Connections from one address share its bucket."""
    security = SecurityConfig(rate_limit=0.01, rate_burst=2)  # no refill within the test
    async with running_server(tiny_llama, server_overrides={"security": security, "host": "localhost"}) as server:
        async def codes(target: str, n: int) -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(target) as channel:
                return [await call(channel, "/certkv.v1.Inference/GetModelInfo",
                                   (False, False, pb.GetModelInfoRequest().SerializeToString()), ()) for _ in range(n)]

        ok, limited = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await codes(f"127.0.0.1:{server.port}", 3) == [ok, ok, limited]
        assert await codes(f"127.0.0.1:{server.port}", 1) == [limited]  # a new connection from the same address
        assert await codes(f"[::1]:{server.port}", 2) == [ok, ok]  # another peer has its own bucket


# ---- TLS -----------------------------------------------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str):
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name: str, server: bool, days: int = 1):
    ca_key, ca_cert = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + datetime.timedelta(days=days)))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _pem(key), cert.public_bytes(serialization.Encoding.PEM)


def ca_pem(ca) -> bytes:
    return ca[1].public_bytes(serialization.Encoding.PEM)


async def reachable(target: str, credentials=None, options=()) -> grpc.StatusCode:
    channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            await channel.unary_unary("/grpc.health.v1.Health/Check")(
                health_pb2.HealthCheckRequest().SerializeToString(), timeout=3)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


async def test_tls_and_mutual_tls(tiny_llama):
    ca, other = make_ca("certkv test CA"), make_ca("someone else")
    server_key, server_cert = issue(ca, "localhost", server=True)
    client_key, client_cert = issue(ca, "client", server=False)
    foreign_key, foreign_cert = issue(other, "client", server=False)
    tls = SecurityConfig(tls_cert=server_cert, tls_key=server_key)
    async with running_server(tiny_llama, server_overrides={"security": tls, "health_port": 0}) as server:
        target = f"localhost:{server.port}"
        assert await reachable(target, grpc.ssl_channel_credentials(ca_pem(ca))) == grpc.StatusCode.OK
        assert await reachable(target) == grpc.StatusCode.UNAVAILABLE  # plaintext against TLS
        assert await reachable(target, grpc.ssl_channel_credentials(ca_pem(other))) == grpc.StatusCode.UNAVAILABLE
        wrong_name = (("grpc.ssl_target_name_override", "not-the-server"),)
        assert await reachable(target, grpc.ssl_channel_credentials(ca_pem(ca)),
                               wrong_name) == grpc.StatusCode.UNAVAILABLE
        assert await reachable(f"127.0.0.1:{server.health_port}") == grpc.StatusCode.OK  # probes: plaintext health
    mtls = SecurityConfig(tls_cert=server_cert, tls_key=server_key, tls_client_ca=ca_pem(ca))
    async with running_server(tiny_llama, server_overrides={"security": mtls}) as server:
        target = f"localhost:{server.port}"
        assert await reachable(target, grpc.ssl_channel_credentials(ca_pem(ca))) == grpc.StatusCode.UNAVAILABLE
        foreign = grpc.ssl_channel_credentials(ca_pem(ca), foreign_key, foreign_cert)
        assert await reachable(target, foreign) == grpc.StatusCode.UNAVAILABLE
        valid = grpc.ssl_channel_credentials(ca_pem(ca), client_key, client_cert)
        assert await reachable(target, valid) == grpc.StatusCode.OK
