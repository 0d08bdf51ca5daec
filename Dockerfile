# dist_hrnas on the official CUDA PyTorch image (see docs/launching.md):
#
#   docker build -t dist_hrnas .
#   docker run --gpus all --ipc=host -v $PWD/runs:/app/runs -v /data/imagenet:/data dist_hrnas \
#     torchrun --standalone --nproc_per_node 8 -m dist_hrnas.train --config configs/hrnas_imagenet.yaml data.root=/data
#
# The runtime image has the CUDA runtime, cuDNN and NCCL but no CUDA compiler (nvcc). That is enough for
# DDP and for DeepSpeed ZeRO 0/1/2 with PyTorch optimizers. DeepSpeed ops that are compiled on first use
# (FusedAdam, CPU Adam for offload, ...) need nvcc: build on the matching -devel image instead,
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-devel -t dist_hrnas .
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /app

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY pyproject.toml constraints.txt README.md ./
COPY dist_hrnas ./dist_hrnas
COPY configs ./configs
COPY launch ./launch

# torch (built for the image's CUDA) comes with the base image and must stay: constraints.txt pins the CPU
# build that the development machines use, so it is not applied whole. Instead:
#  1. pin torch to the version already installed, so pip fails rather than replace it;
#  2. take the versions of our direct dependencies (and numpy) from constraints.txt, so the image runs
#     what CI tests;
#  3. install the package itself with --no-deps: its dependencies are all in place by then, and pip
#     cannot pull another torch through `torch>=2.3` in pyproject.toml.
# matplotlib (the report's plot) and onnx + onnxruntime (latency.backend=onnxruntime) are what `make` installs too.
# DeepSpeed is an sdist: it builds without compiling any op (DS_BUILD_OPS=0) and without a GPU.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/pins.txt \
 && grep -iE '^(numpy|pyyaml|scikit-learn|tqdm|tensorboard|pillow|matplotlib|onnx|onnxruntime)==' constraints.txt >> /tmp/pins.txt \
 && cat /tmp/pins.txt \
 && DS_BUILD_OPS=0 pip install --no-cache-dir -c /tmp/pins.txt \
        deepspeed==0.19.8 tensorboard pyyaml scikit-learn tqdm pillow numpy matplotlib onnx onnxruntime \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, deepspeed, dist_hrnas; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" \
 && rm -f /tmp/pins.txt

# CPU threads per rank (torchrun would set 1); DataLoader workers are separate processes.
ENV OMP_NUM_THREADS=4

# No ENTRYPOINT: `docker run dist_hrnas torchrun ...` (or launch/*.sh) replaces this default.
CMD ["python", "-m", "dist_hrnas.train", "--help"]
