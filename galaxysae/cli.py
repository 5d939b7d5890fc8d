"""The ``galaxysae`` command: one subcommand per job, each a thin door onto ``<module>.run(cfg)``.

A job module defines ``Config`` (a dataclass) and ``run(cfg)``; it may define
``preprocess_toml(data, path)`` to accept a foreign TOML layout, and ``check_config(cfg)`` for
checks beyond ``Config.validate()`` that ``--check`` makes too (cheap ones: no Ray, no data
read; a fault raises ``config.ConfigError``). Modules are imported only when their job is asked
for, so ``galaxysae synth`` never imports Ray or torch.

``galaxysae <job> --config FILE [--KEY VALUE ...] --check`` parses and validates the config as a
run would, prints ``galaxysae <job>: config OK`` and exits 0 without running the job (a config
error exits 2, as in a run): the launchers (``make submit-<job>``, ``make ray-submit-<job>``) run
it before a job is queued, so a missing key fails at once, not after the allocation and Ray
started.
"""

from __future__ import annotations

import contextlib
import importlib
import io
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


CHECK = "--check"
CHECK_HELP = (f"  {CHECK}  parse and validate the config as a run would, print 'config OK' and\n"
              "           exit 0 without running the job (a config error exits 2, as in a run)")


def _usage() -> str:
    width = max(map(len, JOBS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in JOBS.items())
    return (f"usage: galaxysae <job> [--config FILE.toml] [--KEY VALUE ...] [{CHECK}]\n\njobs:\n{rows}\n\n"
            f"options:\n{CHECK_HELP}\n  <job> --help  the job's keys and their defaults\n")


def _job_help(module, name: str) -> str:
    """``galaxysae <job> --help``: the config parser's help (the job's keys), plus ``--check``."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        config.parse_args(module.Config, ["--help"], prog=f"galaxysae {name}")
    lines = [f"{line} [{CHECK}]" if line.startswith(f"usage: galaxysae {name} ") else line
             for line in text.getvalue().rstrip("\n").split("\n")]
    return "\n".join(lines) + f"\n\noptions:\n{CHECK_HELP}"


def load_job(name: str):
    if name not in JOBS:
        raise SystemExit(f"galaxysae: unknown job {config.redact(name)!r}\n\n{_usage()}")
    return importlib.import_module(JOBS[name][0])


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Redacting(logging.Formatter):
    """Log lines (tracebacks included) with credentials replaced (:func:`config.redact_text`)."""

    def format(self, record: logging.LogRecord) -> str:
        return config.redact_text(super().format(record))


class _RedactingStream:
    """A text stream whose writes pass through :func:`config.redact_text` first: what a library
    prints (a warning quoting an s3:// URL with user:password@), Ray's own log handlers and
    Python's last-resort one. Everything else is the wrapped stream's (bytes written to its
    ``buffer`` or to the file descriptor are not seen)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(config.redact_text(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _redacting_records(factory):
    """A LogRecord factory whose records carry their message, and the text of their exception,
    already redacted: what every handler of the process writes, including those Ray and Ray Data
    put on their own loggers (a session file among them) with no formatter of ours."""

    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, at emit
            return record
        clean = config.redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = config.redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    make.galaxysae_redacting = True
    return make


def redact_output() -> None:
    """This process's stdout/stderr and log records redact credentials (once; again: no-op)."""
    if not isinstance(sys.stdout, _RedactingStream):
        sys.stdout = _RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, _RedactingStream):
        sys.stderr = _RedactingStream(sys.stderr)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "galaxysae_redacting", False):
        logging.setLogRecordFactory(_redacting_records(factory))


def setup_worker() -> None:
    """Called first by each of our Ray entry points (the actors' constructors, the tasks, the
    Train and Tune loops; once per process is enough, again is a no-op): the worker process's
    stdout/stderr and log records redact credentials, as the driver's do. Ray copies both into
    its session logs and echoes them on the driver's console, so a secret a worker printed
    would be in both. The ``galaxysae`` loggers of a worker log at INFO like the driver's (a
    worker's root logger has no handler: without one only warnings would show). Not a Ray
    ``worker_process_setup_hook``: a job-wide runtime_env keeps Ray from using its prestarted
    workers (~10 s more start-up a job on a small machine)."""
    redact_output()
    ours = logging.getLogger("galaxysae")
    # a process whose logging is set up (a driver that calls these in-process, pytest) keeps it
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Redacting(LOG_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # a handler Ray or a library puts on the root would print it twice


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    check = CHECK in rest
    rest = [a for a in rest if a != CHECK]
    module = load_job(name)
    if "-h" in rest or "--help" in rest:
        print(_job_help(module, name))
        return 0
    redact_output()  # Ray's and libraries' lines too, not only ours
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])  # no-op where logging is set up
    sys.excepthook = _redacting_excepthook  # the job ends with an error nobody caught
    try:
        cfg = config.parse_args(
            module.Config, rest, prog=f"galaxysae {name}",
            preprocess=getattr(module, "preprocess_toml", None),
        )
        if check:
            extra = getattr(module, "check_config", None)
            if callable(extra):
                extra(cfg)
            print(f"galaxysae {name}: config OK")
            return 0
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
