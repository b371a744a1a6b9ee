"""``python -m megatron_slung.pretrain [flags]``: the pretraining job (see megatron_slung/training/pretrain.py).

Launch it directly (one process), with ``torchrun``, with the ``deepspeed`` launcher or with SLURM ``srun``;
``python -m megatron_slung.pretrain --help`` lists the flags (Megatron's names).
"""

import sys

from megatron_slung.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
