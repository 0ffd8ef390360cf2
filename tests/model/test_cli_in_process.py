"""``magi generate --in-process``: the job through cluster.pipeline in the CLI's own process."""

import io

import av
import pytest

from cluster.client import cli


def test_generate_in_process_writes_a_playable_mp4(tmp_path, inputs_dir, capsys):
    path = next(p for p in sorted((inputs_dir / "prompts").rglob("*.txt")))
    prompt = next(line.strip() for line in path.read_text().splitlines() if line.strip())
    out = tmp_path / "local.mp4"
    assert cli.main(["generate", "--prompt", prompt, "--chunks", "2", "--steps", "4", "-o", str(out),
                     "--quiet", "--in-process"]) == 0
    with av.open(io.BytesIO(out.read_bytes())) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert f"wrote {out} ({frames} frames, 2 chunks)" in capsys.readouterr().out


def test_in_process_and_address_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "p", "-o", "x.mp4", "--in-process", "--address", "h:1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
