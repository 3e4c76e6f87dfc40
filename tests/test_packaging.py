"""`pip install .` as a new user would do it: a wheel built from the checkout's files alone (as a
fresh clone has them, no generated stubs), installed into a fresh virtual environment, then run from an empty
directory so that nothing of the source tree is importable. The installed `certkv` command serves the default model
from the user's cache ($HOME/.cache/certkv) and answers `certkv generate` over gRPC.

Slow (a minute or two installing torch and the dependencies from pip's cache): marked slow, run by `make test`."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("server/pb/certkv/v1/inference_pb2.py", "server/pb/certkv/v1/inference_pb2_grpc.py")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def checkout_copy(dest: Path) -> Path:
    """The files a fresh clone of this work tree has: tracked and untracked-but-not-ignored, nothing generated."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    source = checkout_copy(tmp / "source")
    assert not (source / "server" / "pb").exists()
    # pip's own build isolation: setuptools and grpcio-tools come from the index, as for any user.
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp / "dist", source)
    assert not (source / "server" / "pb").exists()  # a wheel build generates into the wheel, not the source tree
    (built,) = (tmp / "dist").glob("certkv-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed the way the README says: torch first, then the rest
    under the constraints file (so that no dependency moves torch off its CPU build)."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", path)
    pip = path / "bin" / "pip"
    run(pip, "install", "--quiet", "torch==2.13.0")
    run(pip, "install", "--quiet", "-c", ROOT / "constraints.txt", wheel)
    return path


def test_the_wheel_carries_the_stubs_the_license_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert set(STUBS) <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "certkv = server.console:main" in entry_points
    assert not any(n.startswith(("tests/", "loadtest/", ".models/")) for n in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, server: subprocess.Popen, log: Path, seconds: float = 600.0) -> None:
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert server.poll() is None, f"the server exited {server.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"never SERVING:\n{log.read_text()[-4000:]}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="certkv.v1.Inference"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)


def test_the_installed_command_serves_the_default_model(venv, default_model, tmp_path):
    """From an empty directory, with a fresh HOME whose cache holds the default model: `certkv model install` finds
    it there, `certkv serve` serves it, `certkv generate` and `python -m server.client` get text and a certificate."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    models = home / ".cache" / "certkv" / "models"
    models.mkdir(parents=True)
    (models / default_model.name).symlink_to(default_model)  # installed already: no download in a test
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTKV_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {"HOME": str(home), "HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}
    certkv, python = venv / "bin" / "certkv", venv / "bin" / "python"

    where = run(python, "-c", "import server, server.pb.certkv.v1.inference_pb2 as pb, engine.weights as w; "
                              "print(server.__file__); print(w.MODELS_DIR)", cwd=work, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]) == models
    installed = run(certkv, "model", "install", cwd=work, env=env).stdout.strip().splitlines()[-1]
    assert Path(installed) == models / default_model.name

    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(certkv), "serve", "--port", str(port), "--metrics-port", "-1",
                                   "--kv-cache-memory", "64MiB", "--shadow-memory", "128MiB"],
                                  cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(port, server, log)
        target = f"127.0.0.1:{port}"
        done = run(certkv, "generate", "--target", target, "--kv-mode", "audit", "--max-new-tokens", "4",
                   "The capital of France is", cwd=work, env=env, timeout=300)
        assert done.stdout.strip() and done.stderr.strip().splitlines()[-1].startswith("[certificate, audit")
        done = run(python, "-m", "server.client", "--target", target, "--health", cwd=work, env=env, timeout=60)
        assert done.stdout.strip() == "SERVING"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    assert code == 0, log.read_text()[-4000:]
