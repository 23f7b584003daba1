"""The generated kvmem.v1 stubs, with a clear error when they are missing.

The CMake build generates them into ``<build>/python/kvmem/v1/`` (target
``kvmem_python_stubs``); ``kvmem/__init__.py`` extends the package path so
that ``kvmem.v1`` resolves there once ``<build>/python`` is on sys.path.
"""
try:
    from kvmem.v1 import kvmem_pb2 as pb
    from kvmem.v1 import kvmem_pb2_grpc as rpc
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "kvmem: the generated stubs kvmem.v1.kvmem_pb2 are not importable. "
        "Build them (cmake --build build/release --target "
        "kvmem_python_stubs) and put build/release/python on sys.path "
        "next to client/python.") from error

__all__ = ["pb", "rpc"]
