"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/pca.py --config FILE.toml`."""

import sys

from galaxysae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pca", *sys.argv[1:]]))
