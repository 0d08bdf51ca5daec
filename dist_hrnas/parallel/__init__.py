"""Data parallelism: the process group and its collectives (``comm``), the engines the model trains in (plain,
DDP, DeepSpeed: ``engine``, ``deepspeed_engine``), and building them again after a shrink (``rewrap``).

``comm`` imports only config and errors, so every layer may use it; it is the only module that touches
``torch.distributed``. ``engine`` and ``rewrap`` may import models and optim; nothing here imports latency,
search or train.
"""
