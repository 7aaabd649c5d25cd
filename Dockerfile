# The server alone: onnxruntime, tokenizers, numpy and the HTTP stack (`.[serve]`), no torch, no transformers.
#   docker build -t edgetune-serve .
#   docker run -p 8080:8080 -v $PWD/runs/models:/models:ro edgetune-serve
# /models holds one export folder per model (`make export` writes RUN/export; copy or link it in as /models/NAME).
# For NVIDIA GPUs build on a CUDA runtime image with --build-arg ORT=onnxruntime-gpu==1.31.1 (same module name).
FROM python:3.11-slim
ARG ORT=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY adapters adapters
COPY text text
COPY train train
COPY export export
COPY serve serve
COPY bench bench
COPY kernels kernels
RUN pip install --no-cache-dir ".[serve]" \
 && if [ -n "$ORT" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir "$ORT"; fi
RUN useradd --system --no-create-home edgetune
USER edgetune
EXPOSE 8080
# 0.0.0.0 inside the container only; --api-key or $EDGETUNE_API_KEY guards every route but the health probes
ENTRYPOINT ["python", "-m", "serve", "--host", "0.0.0.0", "--port", "8080", "--models", "/models"]
