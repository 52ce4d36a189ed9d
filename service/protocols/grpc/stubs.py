"""The KServe v2 / Triton gRPC messages and service stubs.

They are the modules protoc and grpcio-tools generated from Triton's
``grpc_service.proto`` and ``model_config.proto`` (triton-inference-server/common,
BSD-3-Clause), as the ``tritonclient`` wheel ships them: the same definitions
Triton's own clients are built from, pinned by the ``tritonclient`` version in
pyproject.toml, never written by hand.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as model_config
from tritonclient.grpc import service_pb2 as messages
from tritonclient.grpc import service_pb2_grpc as services

__all__ = ["messages", "model_config", "services"]
