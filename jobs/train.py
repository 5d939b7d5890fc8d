"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config FILE.toml`."""

import sys

from galaxysae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
