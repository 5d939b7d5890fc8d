"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/stage.py --config FILE.toml`."""

import sys

from galaxysae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["stage", *sys.argv[1:]]))
