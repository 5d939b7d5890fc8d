"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/synth.py --config FILE.toml`."""

import sys

from galaxysae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synth", *sys.argv[1:]]))
