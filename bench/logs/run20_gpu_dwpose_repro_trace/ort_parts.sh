# copy this call's part of onnxruntime-gpu into /tmp/ortp; after the last part, assemble, check, unpack to /tmp/site
set -e
mkdir -p /tmp/ortp && cp .devcarry/o*/p0* /tmp/ortp/ && ls -la /tmp/ortp
if [ "$(ls /tmp/ortp | wc -l)" = 4 ]; then
  cat /tmp/ortp/p00 /tmp/ortp/p01 /tmp/ortp/p02 /tmp/ortp/p03 > /tmp/ortgpu.tar.xz && sha256sum /tmp/ortgpu.tar.xz
  mkdir -p /tmp/site && tar -xJf /tmp/ortgpu.tar.xz -C /tmp/site && rm -f /tmp/ortgpu.tar.xz
  PYTHONPATH=/tmp/site python3 -c "import torch, onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())"
fi
