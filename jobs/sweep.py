"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/sweep.py --config FILE.toml`."""

import sys

from galaxysae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
