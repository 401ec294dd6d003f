# radpipe node, CPU image. For a CUDA image: --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
# together with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (and a Python 3.11+ base).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /opt/radpipe
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY plugin ./plugin
RUN pip install --no-cache-dir .
COPY pipelines ./pipelines
COPY deploy/radpipe.yaml /etc/radpipe/radpipe.yaml

ENV RADPIPE_NODE_HOST=0.0.0.0 \
    RADPIPE_METRICS_HOST=0.0.0.0 \
    RADPIPE_STORAGE_DIR=/var/lib/radpipe \
    RADPIPE_PIPELINES_DIR=/opt/radpipe/pipelines
VOLUME /var/lib/radpipe
EXPOSE 11112 9400
ENTRYPOINT ["radpipe"]
CMD ["serve", "--config", "/etc/radpipe/radpipe.yaml"]
