# The lineray image for KubeRay (configs/kuberay/*.yaml): Ray's GPU image of the Ray version the
# manifests name (rayVersion 2.60.0, Python 3.11, CUDA), plus torch pinned as the Makefile pins it,
# plus lineray with its bundled model.
#   docker build -t ghcr.io/example/lineray:0.1.0-ray2.60.0-gpu .   (--build-arg EXTRAS=[t2i] for text prompts)
#   docker push ghcr.io/example/lineray:0.1.0-ray2.60.0-gpu     (then name your registry in the manifests)
FROM rayproject/ray:2.60.0-py311-gpu

# torch first and pinned: an unpinned resolve could replace it with another build. On this image
# (Linux x86_64) PyPI's torch 2.13.0 wheel is the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0

# Only what the wheel needs (see .dockerignore); Ray is already in the image and satisfies lineray's range.
COPY --chown=ray:users pyproject.toml README.md /tmp/lineray/
COPY --chown=ray:users lineray /tmp/lineray/lineray
ARG EXTRAS=""
RUN pip install --no-cache-dir "/tmp/lineray${EXTRAS}" && rm -rf /tmp/lineray \
    && python -c "import lineray, ray; assert ray.__version__ == '2.60.0', ray.__version__"
