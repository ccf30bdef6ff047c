# fedmitr web app as a container (e.g. a Docker Hugging Face Space): CPU-only torch, port 7860.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

# Spaces run containers as uid 1000 with a writable $HOME.
RUN useradd -m -u 1000 user
WORKDIR /home/user/app

COPY requirements.txt pyproject.toml ./
# The CPU wheels of torch/torchvision (the same pinned versions) keep the image small.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY --chown=user . .
RUN pip install --no-deps .

USER user
ENV HOME=/home/user
EXPOSE 7860
CMD ["python", "app/app.py"]
