# fedmitr web app as a container (e.g. a Docker Hugging Face Space): CPU-only torch, port 7860.
#
#   docker build -t fedmitr-app .
#   docker run --rm -p 7860:7860 fedmitr-app          # http://localhost:7860
#
# BASE: any image with Python 3.11 and its venv module. The default is the official slim image; a
# Debian bookworm base with python3-venv works too (scripts/container_check.sh builds with one).
ARG BASE=python:3.11-slim
FROM ${BASE}

# Where torch and torchvision come from, and the local version label of the build wanted. The
# defaults take the CPU-only wheels (torch 2.14.1+cpu), a few hundred MB instead of the ~5 GB of
# CUDA libraries that PyPI's default Linux build pulls in. Without access to download.pytorch.org,
# `--build-arg TORCH_INDEX=https://pypi.org/simple --build-arg TORCH_LOCAL=` takes PyPI's build
# (CUDA; it runs on the CPU too, but the image is ~6 GB).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_LOCAL=+cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

# Spaces run containers as uid 1000 with a writable $HOME.
RUN useradd -m -u 1000 user
WORKDIR /home/user/app
RUN chown user:user /home/user/app

# A virtual environment: the same on every base (Debian's own python refuses a system-wide pip
# install, PEP 668), and it provides `python` for the CMD.
RUN python3 -m venv /opt/venv

# Dependencies before the source, so a code change does not reinstall them.
COPY requirements.txt ./
# 1. torch and torchvision at requirements.txt's pins, spelled with the local label
#    (torch==2.14.1 -> torch==2.14.1+cpu) and taken from TORCH_INDEX first: if that index cannot be
#    reached the build fails, instead of quietly installing the CUDA build from PyPI.
# 2. The rest of requirements.txt (minus the test-only pytest and playwright), constrained to the
#    torch build just installed (==2.14.1 accepts 2.14.1+cpu, so it stays).
RUN sed -n -E "s/^(torch|torchvision)==([^[:space:]#;]+).*/\1==\2${TORCH_LOCAL}/p" requirements.txt > /tmp/torch.txt \
 && test "$(wc -l < /tmp/torch.txt)" -eq 2 \
 && pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple -r /tmp/torch.txt \
 && grep -v -E '^(pytest|playwright)([=<>!~;[:space:]]|$)' requirements.txt > /tmp/app-requirements.txt \
 && pip install -r /tmp/app-requirements.txt -c /tmp/torch.txt \
 && rm /tmp/torch.txt /tmp/app-requirements.txt

COPY --chown=user . .
RUN pip install --no-deps . && rm -rf build *.egg-info

USER user
ENV HOME=/home/user
EXPOSE 7860
CMD ["python", "app/app.py"]
