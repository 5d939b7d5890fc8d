"""The typed config loader: TOML + command line, strict keys and types, resolved config saved."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from galaxysae import config
from galaxysae.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Job:
    """A test job."""

    output: str = "out"
    k: int = 64
    groups: list[int] = field(default_factory=lambda: [64, 64])
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = False
    limit: Optional[int] = None
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_toml_and_overrides(tmp_path):
    path = write(tmp_path, 'k = 32\ngroups = [1, 2, 3]\n[optim]\nlr = 3\n')
    cfg = config.parse_args(Job, ["--config", path, "--optim.lr", "0.5", "--resume", "--limit=7"])
    assert cfg.k == 32 and cfg.groups == [1, 2, 3]
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.resume is True and cfg.limit == 7
    cfg = config.parse_args(Job, ["--groups", "4,5", "--precision", "bf16", "--optim.betas", "[0.5, 0.6]"])
    assert cfg.groups == [4, 5] and cfg.precision == "bf16" and cfg.optim.betas == [0.5, 0.6]


def test_misspelt_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "k = 3\n[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError) as err:
        config.parse_args(Job, ["--config", path])
    assert "optim.learning_rate" in str(err.value) and path in str(err.value)


def test_misspelt_key_on_command_line():
    with pytest.raises(ConfigError, match="'kk'"):
        config.parse_args(Job, ["--kk", "3"])


@pytest.mark.parametrize("text,key", [
    ('k = "many"', "k"), ("k = true", "k"), ('precision = "fp16"', "precision"),
    ('groups = [1, "x"]', "groups[1]"), ("optim = 3", "optim"),
])
def test_wrong_types_rejected(tmp_path, text, key):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        config.parse_args(Job, ["--config", path])
    assert f"'{key}'" in str(err.value) and path in str(err.value)


def test_validate_runs_and_names_source(tmp_path):
    path = write(tmp_path, "k = -1\n")
    with pytest.raises(ConfigError, match="k must be positive"):
        config.parse_args(Job, ["--config", path])


def test_saved_config_round_trips_and_redacts(tmp_path):
    cfg = config.parse_args(Job, ["--output", "s3://user:hunter2@bucket/x", "--groups", "1,2"])
    target = config.save(cfg, str(tmp_path))
    text = open(target).read()
    assert "hunter2" not in text
    data = tomllib.loads(text)
    back = config.from_dict(Job, data, target)
    assert dataclasses.replace(back, output=cfg.output) == cfg


def test_saved_config_round_trips_characters_toml_escapes_differently_from_json(tmp_path):
    """An emoji (beyond the BMP: JSON's ASCII escape is a surrogate pair, which TOML rejects), a
    control character and DEL (which TOML wants escaped and JSON does not) load back as saved."""
    output = "results/🌌 galaxies\x01\x7f\ttabbed \"quoted\" \\ é"
    cfg = config.parse_args(Job, ["--output", output])
    target = config.save(cfg, str(tmp_path))
    back = config.from_dict(Job, tomllib.loads(Path(target).read_text(encoding="utf-8")), target)
    assert back == cfg and back.output == output


@dataclass
class Secrets:
    dataset: str = ""
    hf_token: int = 0
    resume: bool = False
    parts: list[str] = field(default_factory=list)


@pytest.mark.parametrize("job,argv,key,secret", [
    ("stage", ["--dataset", "https://user:hf_SECRETTOKEN@huggingface.co/datasets/x"], "dataset",
     "hf_SECRETTOKEN"),
    ("hub", ["--hf_home", "HF", "--dataset", "s3://AKIAXXX:SECRETKEY@bucket/ds"], "dataset", "SECRETKEY"),
    ("synth", ["--out", "OUT", "--n_train", "s3://AKIAXXX:SECRETKEY@bucket/n"], "n_train", "SECRETKEY"),
])
def test_a_credential_in_a_url_is_not_echoed_by_a_config_error(tmp_path, job, argv, key, secret):
    """The error names the key at fault and shows the value, less its user:password@."""
    argv = [a.replace("HF", str(tmp_path / "hf")).replace("OUT", str(tmp_path / "out")) for a in argv]
    if job == "stage":
        argv += ["--output", str(tmp_path / "staged")]
    proc = subprocess.run([sys.executable, "-m", "galaxysae", job, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"key '{key}'" in proc.stderr and "://***@" in proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("argv,shown", [
    (["--hf_token", "hf_hunter2"], "got str '***'"),  # a secret-looking key: all of its value
    (["--resume", "s3://k:hunter2@b/x"], "got 's3://***@b/x'"),
    (["--parts", "[s3://k:hunter2@b/x"], "got '[s3://***@b/x'"),
    (["s3://k:hunter2@b/x"], "argument 's3://***@b/x'"),
])
def test_every_message_that_quotes_a_value_redacts_it(argv, shown):
    with pytest.raises(ConfigError) as err:
        config.parse_args(Secrets, argv)
    assert shown in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # from a TOML file
        config.from_dict(Secrets, {"dataset": ["s3://k:hunter2@b/x"]}, "f.toml")
    assert "['s3://***@b/x']" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("text,shown", [
    # an AWS secret key has "/" in it, and is pasted into a URL unencoded
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/emb",
     "s3://***@bucket/emb"),
    ("failed: 'https://user:hf_tok@huggingface.co/x' and 'a@b'", "failed: 'https://***@huggingface.co/x' and 'a@b'"),
    ("s3://bucket/by-author/ann@example.org/x", "s3://bucket/by-author/ann@example.org/x"),  # a path's @
    # a password with "@" (and "/") pasted unencoded: hidden whole, not up to its first "@"
    ("s3://AKIAEXAMPLE:p@ss/w@rd@bucket/emb", "s3://***@bucket/emb"),
    ("['s3://k:hunt@r2@b/x','a@b']", "['s3://***@b/x','a@b']"),  # ends at the quote
    ("https://hf_tok@huggingface.co/x", "https://***@huggingface.co/x"),  # a token, no ":"
])
def test_url_credentials_are_redacted_from_free_text(text, shown):
    assert config.redact_text(text) == shown


def test_exit_on_error_redacts_what_a_message_still_carries(capsys):
    """The last line of defence: an error whose text was set past the redacting constructor."""
    exc = ConfigError("placeholder")
    exc.args = ("f.toml: key 'dataset' got 's3://AKIAXXX:SECRETKEY@bucket/ds'",)
    with pytest.raises(SystemExit) as stop:
        config.exit_on_error(exc)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "SECRETKEY" not in err and "key 'dataset'" in err


def test_an_override_at_fault_is_blamed_on_the_command_line_not_the_file(tmp_path):
    from galaxysae import synth

    demo = str(REPO / "configs" / "demo" / "synth.toml")
    with pytest.raises(ConfigError) as err:
        config.parse_args(synth.Config, ["--config", demo, "--out", "x", "--n_train", "0"])
    assert str(err.value).startswith("--n_train on the command line: key 'n_train' must be >= 1")
    assert "synth.toml" not in str(err.value)
    path = write(tmp_path, "k = 3\n")
    with pytest.raises(ConfigError, match=r"^--k on the command line: k must be positive"):
        config.parse_args(Job, ["--config", path, "--k=-2"])
    # the file's own value at fault still names the file, with other keys overridden
    path = write(tmp_path, "k = -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: k must be positive"):
        config.parse_args(Job, ["--config", path, "--limit", "3", "--optim.lr", "1"])


@dataclass
class Paths:
    data: str = ""
    parts: list[str] = field(default_factory=list)
    output: str = ""


def test_absolute_paths_resolve_local_paths_on_the_driver_and_leave_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Paths(data="emb", parts=["a", "s3://b/c", "/abs"], output="file://sae")
    out = config.absolute_paths(cfg, inputs=("data", "parts"), outputs=("output",))
    assert out == Paths(data=str(tmp_path / "emb"), parts=[str(tmp_path / "a"), "s3://b/c", "/abs"],
                        output=str(tmp_path / "sae"))
    assert cfg.data == "emb"  # a copy: the caller's config is untouched
    assert config.absolute_paths(Paths(), inputs=("data",), outputs=("output",)) == Paths()


def test_a_relative_output_inside_a_ray_job_working_dir_copy_is_refused(tmp_path, monkeypatch):
    # where `ray job submit --working-dir .` runs the entrypoint
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match=r"'output' = 'sae/topk' is a relative path, and this job "
                       r"runs in Ray's temporary copy of the uploaded working dir"):
        config.absolute_paths(Paths(output="sae/topk"), outputs=("output",))
    # inputs shipped with the working dir, absolute outputs and URLs are fine there
    out = config.absolute_paths(Paths(data="configs/x", output="/shared/sae"), inputs=("data",),
                                outputs=("output",))
    assert out.data == str(copy / "configs/x") and out.output == "/shared/sae"
    assert config.absolute_paths(Paths(output="s3://b/sae"), outputs=("output",)).output == "s3://b/sae"


# the shipped configs leave these to the command line (README: --embeddings s3://..., --out ...)
FROM_THE_COMMAND_LINE = {"embeddings": "s3://bucket/embeddings", "output": "s3://bucket/out",
                         "out": "s3://bucket/demo"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("**/*.toml")),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads_into_its_job(path):
    """A key misspelt or of the wrong type in a shipped config would stop a user's first run."""
    from galaxysae import cli

    job = {"train_topk": "train", "train_matryoshka": "train", "matryoshka": "train"}.get(path.stem, path.stem)
    module = cli.load_job(job)
    data = tomllib.loads(path.read_text())
    if hasattr(module, "preprocess_toml"):  # the original research layout (matryoshka.toml)
        data = module.preprocess_toml(data, str(path))
    fields = {f.name for f in dataclasses.fields(module.Config)}
    for key, value in FROM_THE_COMMAND_LINE.items():
        if key in fields and not data.get(key):
            data[key] = value
    cfg = config.from_dict(module.Config, data, str(path))
    assert config.to_dict(cfg)  # every key known, every value of its type, validate() passed


def test_an_uncaught_error_and_log_lines_quote_no_credential(tmp_path):
    """Past config errors: a job that fails deep inside a library prints Python's traceback, and
    log lines quote URLs; both pass through the same redaction (URL user:password@ and the
    values of the credential variables), as a batch log is read by more people than its owner."""
    import logging

    from galaxysae import cli

    secret = "hf_" + "q7Zr" * 6
    env = {**os.environ, "HF_TOKEN": secret, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "galaxysae", "atlas", "--results",
                           str(tmp_path / f"results-{secret}"), "--output", str(tmp_path / "site")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert "results-***: no dictionary results found" in proc.stderr and secret not in proc.stderr + proc.stdout
    record = logging.LogRecord("galaxysae.x", logging.INFO, __file__, 1, "reading %s",
                               ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/emb",), None)
    line = cli._Redacting("%(levelname)s %(message)s").format(record)
    assert line == "INFO reading s3://***@bucket/emb"


REDACTED_PROCESS = """
import logging, sys
from galaxysae import cli

cli.redact_output()
# a handler of a library's own, no formatter of ours (as Ray Data's session log file)
lib = logging.getLogger("ray.data.some_module")
lib.propagate = False
lib.addHandler(logging.FileHandler(sys.argv[1]))
lib.error("reading %s failed", "s3://AKIAEXAMPLE:wJalr/K7MDENG@bucket/emb")
try:
    raise OSError("403 for s3://AKIAEXAMPLE:wJalr/K7MDENG@bucket/x")
except OSError:
    lib.exception("listing")
print("a library prints s3://AKIAEXAMPLE:wJalr/K7MDENG@bucket/y")
sys.stderr.writelines(["and writes lines s3://AKIAEXAMPLE:wJalr/K7MDENG@bucket/z\\n"])
"""


def test_every_log_record_and_write_of_a_job_process_is_redacted(tmp_path):
    """A job's process (driver or Ray worker, cli.redact_output): log records of any logger,
    exceptions logged with them, prints and writelines, whatever handler or stream they reach."""
    log = tmp_path / "lib.log"
    proc = subprocess.run([sys.executable, "-c", REDACTED_PROCESS, str(log)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    text = log.read_text() + proc.stdout + proc.stderr
    assert "wJalr" not in text, text
    assert "reading s3://***@bucket/emb failed" in text and "OSError: 403 for s3://***@bucket/x" in text
    assert "prints s3://***@bucket/y" in proc.stdout and "lines s3://***@bucket/z" in proc.stderr

