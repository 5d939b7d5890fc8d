"""The ``galaxysae`` command: one subcommand per job, each a thin door onto ``<module>.run(cfg)``.

A job module defines ``Config`` (a dataclass) and ``run(cfg)``; it may define
``preprocess_toml(data, path)`` to accept a foreign TOML layout. Modules are imported only when
their job is asked for, so ``galaxysae synth`` never imports Ray or torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

from galaxysae import config

# job name -> (module, one-line description)
JOBS: dict[str, tuple[str, str]] = {
    "synth": ("galaxysae.synth", "generate a gz_euclid-shaped dataset of procedural galaxies"),
    "hub": ("galaxysae.hub", "build an offline Hugging Face cache (stand-in encoder + dataset)"),
    "stage": ("galaxysae.stage", "copy a Hub dataset and encoder to a shared dir or s3:// prefix"),
    "embed": ("galaxysae.embed", "Zoobot embeddings of every galaxy, streamed with Ray Data"),
    "train": ("galaxysae.train", "train a TopK or Matryoshka sparse autoencoder (Ray Train)"),
    "sweep": ("galaxysae.sweep", "a Ray Tune sweep of SAE trainings"),
    "pca": ("galaxysae.pca", "the PCA baseline dictionary"),
    "render": ("galaxysae.render", "grids of each feature's most exciting galaxies"),
    "compare": ("galaxysae.compare", "align features with Galaxy Zoo vote fractions"),
    "atlas": ("galaxysae.atlas", "the static HTML atlas"),
}


def _usage() -> str:
    width = max(map(len, JOBS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in JOBS.items())
    return f"usage: galaxysae <job> [--config FILE.toml] [--KEY VALUE ...]\n\njobs:\n{rows}\n"


def load_job(name: str):
    if name not in JOBS:
        raise SystemExit(f"galaxysae: unknown job {config.redact(name)!r}\n\n{_usage()}")
    return importlib.import_module(JOBS[name][0])


class _Redacting(logging.Formatter):
    """Log lines (tracebacks included) with credentials replaced (:func:`config.redact_text`)."""

    def format(self, record: logging.LogRecord) -> str:
        return config.redact_text(super().format(record))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    module = load_job(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])  # no-op where logging is set up
    sys.excepthook = _redacting_excepthook  # the job ends with an error nobody caught
    try:
        cfg = config.parse_args(
            module.Config, rest, prog=f"galaxysae {name}",
            preprocess=getattr(module, "preprocess_toml", None),
        )
        result = module.run(cfg)  # may still find a key at fault (a path, a file it names)
    except config.ConfigError as exc:
        config.exit_on_error(exc)
    return result if isinstance(result, int) else 0


def _redacting_excepthook(kind, exc, tb) -> None:
    """An uncaught exception's traceback as Python prints it, less the credentials it may quote."""
    import traceback

    print(config.redact_text("".join(traceback.format_exception(kind, exc, tb))), file=sys.stderr, end="")


if __name__ == "__main__":
    raise SystemExit(main())
