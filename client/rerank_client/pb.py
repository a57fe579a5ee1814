"""The generated rerank.v1 code under one public name, and the service's full name defined once.

    from rerank_client.pb import SERVICE_NAME, rerank_pb2, rerank_pb2_grpc

`_proto/` is generated (tools/generate_protos.py) and private in layout; the server, the SDK and the
tests import it through here.
"""

from rerank_client._proto.rerank.v1 import rerank_pb2, rerank_pb2_grpc

SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"]
# "rerank.v1.RerankService": health service names, reflection, method paths and span names derive from it.
SERVICE_NAME: str = SERVICE.full_name
# Method paths start with it: "/rerank.v1.RerankService/Rerank".
METHOD_PREFIX = f"/{SERVICE_NAME}/"

__all__ = ["METHOD_PREFIX", "SERVICE", "SERVICE_NAME", "rerank_pb2", "rerank_pb2_grpc"]
