#!/usr/bin/env python
"""The experiment: toxic share {0, 5, 10, 25}% x treatment {ce, filtered, masked, unlikelihood, tags,
rephrased, refusal}.

    python examples/experiment.py --scale tiny         # CPU: 28 small GPTs, about 75 minutes on 2 cores (estimated)
    python examples/experiment.py --scale gpu-hours    # one GPU, hours (bring more text with --input)

For each run: perplexity of clean held-out text, generation toxicity, probe F1/AUROC, zero-shot F1, the
effect of steering (ITI) and safe beam search. Output in runs/experiment-SCALE/: results.md (one table),
results.json, results.png (each metric against the toxic share, one line per treatment). The stages are
the quickstart's (megatron_slung/experiment/); a rerun reuses finished runs. Options: --help.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_slung.experiment.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(quickstart=False))
