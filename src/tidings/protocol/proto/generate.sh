#!/bin/sh
# Regenerates client_pb2.py (and .pyi) from client.proto, centrifugal/protocol's
# definitions/client.proto (https://github.com/centrifugal/protocol). Run from anywhere:
#   python -m venv /tmp/protoc && /tmp/protoc/bin/pip install grpcio-tools
#   PYTHON=/tmp/protoc/bin/python src/tidings/protocol/proto/generate.sh
# The generated module's types go into a descriptor pool of their own (the sed below), not
# protobuf's default pool: another copy of the same .proto (centrifuge-python ships one) may
# be loaded in the same process. The protoc release must not be newer than the protobuf
# runtime pinned in pyproject.toml (the generated code checks it on import).
set -eu
cd "$(dirname "$0")"
"${PYTHON:-python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. client.proto
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' client_pb2.py
