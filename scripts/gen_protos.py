"""Regenerate peer/wire/*_pb2.py and .pyi from protos/*.proto.

    python -m scripts.gen_protos            # write into peer/wire/
    python -m scripts.gen_protos --check    # exit 1 if the committed code is stale

The proto directory is mapped to the virtual path peer/wire so that generated imports are
package-qualified (``from peer.wire import ...``).
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("peer") / "wire"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto; return the generated files (relative to out_root)."""
    import grpc_tools  # lazy: only needed by developers

    protos = sorted(PROTOS.glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    # protoc runs in its own process: loaded in-process beside TensorFlow's protobuf it can
    # crash the interpreter.
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PACKAGE.as_posix()}={PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        *[(PACKAGE / p.name).as_posix() for p in protos],
    ]
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603  (our own fixed argv)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {result.stderr.strip()}")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).glob("*_pb2.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check freshness")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            str(rel)
            for rel in generate(Path(tmp))
            if not (ROOT / rel).exists()
            or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)
        ]
    if stale:
        print(
            f"stale generated code: {', '.join(stale)}; run python -m scripts.gen_protos",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
