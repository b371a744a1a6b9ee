#!/usr/bin/env python
"""The quickstart: real text -> risk tags -> tokenizer -> preprocess -> pretrain ce / masked / unlikelihood
GPTs on the CPU at 10% toxic share -> evaluate -> results table, results.json, results.md, results.png.

    python examples/quickstart.py                      # into runs/quickstart/ (rerun: reuses what is built)
    python examples/quickstart.py --input my.jsonl --run-dir runs/mine
    python examples/quickstart.py --treatments ce,filtered,masked,unlikelihood,tags --shares 10

`bash scripts/quickstart.sh` sets up the environment and runs this. Options: --help.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_slung.experiment.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(quickstart=True))
