"""``magi generate`` without --address: embedded Ray + Serve, one job, clean shutdown."""

import io
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]


def test_generate_with_embedded_local_service(tmp_path):
    out = tmp_path / "local.mp4"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.client.cli", "generate", "--prompt", "a kite over a hill",
         "--chunks", "2", "--steps", "4", "-o", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout and "TTFC" in proc.stdout
    with av.open(io.BytesIO(out.read_bytes())) as container:
        assert sum(1 for _ in container.decode(video=0)) == 48
