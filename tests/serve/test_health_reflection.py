"""grpc.health.v1 and server reflection on Serve's gRPC proxy."""

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

pytestmark = pytest.mark.serve


@pytest.mark.parametrize("service_name", ["", "magi.v1.VideoGeneration"])
def test_health_serving(client, service_name):
    assert client.health(service_name) == "SERVING"


def test_health_unknown_service(client):
    with pytest.raises(grpc.RpcError) as info:
        client.health("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(service):
    with grpc.insecure_channel(service.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"magi.v1.VideoGeneration", "grpc.health.v1.Health"} <= services
        generate = DescriptorPool(db).FindServiceByName("magi.v1.VideoGeneration").methods_by_name["Generate"]
        assert generate.server_streaming and not generate.client_streaming
        assert generate.input_type.fields_by_name["num_chunks"].number == 4
        assert set(generate.output_type.oneofs_by_name["event"].fields[i].name for i in range(4)) == {
            "accepted", "progress", "chunk", "done"}
