"""The seed's entry point: `python experiments/cli/train_lora.py --config configs/lora_fcd.yaml --base_checkpoint X`.

A thin forwarder to `neuromf train-lora` (same flags, same function).
"""

import sys

from neuromf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]]))
