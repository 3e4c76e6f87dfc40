"""Build hook: the gRPC stubs in server/pb are generated from proto/ whenever a wheel is built (grpcio-tools is a build
requirement), so `pip install .` from a fresh clone gives a package that imports them; an editable install writes
them into the source tree, where `make proto` puts them. Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = ROOT / "proto" / "certkv" / "v1" / "inference.proto"


def generate_stubs(out: Path) -> None:
    """server/pb/certkv/v1/inference_pb2{,_grpc}.py and .pyi under `out`, importable as server.pb.certkv.v1."""
    from grpc_tools import protoc

    args = ["protoc", f"-Iserver/pb={ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(ROOT if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithStubs})
