"""The committed generated modules match the .proto, and the API has the documented shape."""

import subprocess
import sys
from pathlib import Path

from magi.v1 import generate_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = sorted((ROOT / "proto" / "magi" / "v1").glob("*_pb2*.py*"))


def test_generated_modules_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted((tmp_path / "magi" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED]
    stale = [p.name for p, q in zip(GENERATED, fresh) if p.read_bytes() != q.read_bytes()]
    assert not stale, f"regenerate with `python scripts/gen_proto.py`: {stale} are stale"


def test_service_is_server_streaming():
    method = pb.DESCRIPTOR.services_by_name["VideoGeneration"].methods_by_name["Generate"]
    assert method.input_type.full_name == "magi.v1.GenerateRequest"
    assert method.output_type.full_name == "magi.v1.GenerateResponse"
    assert method.server_streaming and not method.client_streaming


def test_oneofs():
    req = pb.GenerateRequest(image=b"x")
    req.prefix_video = b"y"
    assert req.WhichOneof("condition") == "prefix_video" and not req.image
    events = pb.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in events.fields] == ["accepted", "progress", "chunk", "done", "queued"]


def test_every_field_and_enum_value_is_documented(tmp_path):
    """Each field and enum value carries a leading comment in the .proto (units, ranges)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", "--include_source_info",
                        f"--descriptor_set_out={out}", "magi/v1/generate.proto"]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments = {tuple(loc.path): loc.leading_comments for loc in fds.file[0].source_code_info.location}
    proto = fds.file[0]
    missing = []
    for m, msg in enumerate(proto.message_type):
        for f, field in enumerate(msg.field):  # 4 = message_type, 2 = field
            if not comments.get((4, m, 2, f), "").strip():
                missing.append(f"{msg.name}.{field.name}")
    for e, enum in enumerate(proto.enum_type):
        for v, value in enumerate(enum.value):  # 5 = enum_type, 2 = value
            if not comments.get((5, e, 2, v), "").strip():
                missing.append(value.name)
    assert not missing, f"undocumented: {missing}"


def test_update_prompt_is_unary():
    method = pb.DESCRIPTOR.services_by_name["VideoGeneration"].methods_by_name["UpdatePrompt"]
    assert method.input_type.full_name == "magi.v1.UpdatePromptRequest"
    assert method.output_type.full_name == "magi.v1.UpdatePromptResponse"
    assert not method.server_streaming and not method.client_streaming
