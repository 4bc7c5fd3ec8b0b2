"""The Python code generated from proto/ must match the .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("transport_pb2.py", "transport_pb2_grpc.py", "control_pb2.py", "control_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path):
    protos = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    )

    for name in GENERATED:
        fresh = (tmp_path / "fleetkit" / "rpc" / name).read_text()
        committed = (ROOT / "fleetkit" / "rpc" / name).read_text()
        assert committed == fresh, f"fleetkit/rpc/{name} is stale; run scripts/gen-proto and commit the result"
