# dist_hrnas on an official CUDA PyTorch image: `docker build -t dist_hrnas .`
# docker run --gpus all --ipc=host -v $PWD/runs:/app/runs dist_hrnas \
#   torchrun --standalone --nproc_per_node 8 -m dist_hrnas.train --config configs/hrnas_imagenet.yaml data.root=/data
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY dist_hrnas ./dist_hrnas
COPY configs ./configs
COPY launch ./launch
# torch comes from the base image; install the rest without touching it.
RUN pip install --no-cache-dir pyyaml scikit-learn tqdm tensorboard pillow deepspeed \
 && pip install --no-cache-dir --no-deps -e .
ENV OMP_NUM_THREADS=4
CMD ["python", "-m", "dist_hrnas.train", "--help"]
