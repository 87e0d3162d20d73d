"""Every command line the documentation prints composes: the ``python train.py`` and
``lmprobe`` lines of README.md, docs/, train.py and the comments in conf/, found in the
files themselves (new ones are covered), each composed with Hydra's compose API (no run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

import lmprobe.app.schema  # noqa: F401  (registers the schemas the configs start from)

ROOT = Path(__file__).resolve().parents[1]
# a command at the start of a code line or code span; train.py also inside a comment's text
START = r"(?:\S*python\s+train\.py|lmprobe)(?=\s|$)"
IN_CODE_LINE = re.compile(rf"^(?:[A-Z_]+=\S+\s+)*{START}(.*)$")  # after VAR=value prefixes
IN_SPAN = re.compile(rf"^{START}(.*)$", re.S)
IN_TEXT = re.compile(r"\bpython\s+train\.py(?=\s|$)(.*)$")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`+([^`]+)`+")
# The user folder of README's --config-dir example ("my-conf/data/mine.yaml starting with
# defaults: [csv, _self_]"), written where a command names one.
USER_GROUPS = {"data/mine.yaml": "defaults:\n  - csv\n  - _self_\n\npath: reviews.csv\n"}


def joined(lines: list[str]) -> list[tuple[int, str]]:
    """Lines with their backslash continuations joined, each with its first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        start, text = pending if pending else (number, "")
        text += " " + line.strip()
        pending = (start, text[:-1]) if text.endswith("\\") else None
        if pending is None:
            out.append((start, text.strip()))
    return out


def arguments(rest: str) -> list[str]:
    """The command's arguments: up to a comment, without prose placeholders ('...')."""
    rest = re.split(r"\s#", " " + rest, maxsplit=1)[0]
    return [t for t in shlex.split(rest) if t not in ("...", "[overrides]")]


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first = text.count("\n", 0, block.start(1)) + 1
            for number, line in joined(block.group(1).splitlines()):
                if match := IN_CODE_LINE.match(line):
                    found.append((f"{path.name}:{first + number - 1}", match.group(1)))
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for span in SPAN.finditer(prose):
            if match := IN_SPAN.match(span.group(1).replace("\n", " ")):
                line = prose.count("\n", 0, span.start()) + 1
                found.append((f"{path.name}:{line}", match.group(1)))
    for path in [ROOT / "train.py", *sorted((ROOT / "conf").rglob("*.yaml"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".yaml":  # comments only, '#' removed
            lines = [re.sub(r"^\s*#", "", s) if s.lstrip().startswith("#") else "" for s in lines]
        for number, line in joined(lines):
            for piece in SPAN.sub(lambda m: f" {m.group(1)} ``", line).split("``"):
                if match := IN_TEXT.search(piece):
                    found.append((f"{path.relative_to(ROOT)}:{number}", match.group(1)))
    unique: dict[tuple[str, ...], str] = {}  # each command once, where it is first printed
    for where, rest in found:
        unique.setdefault(tuple(arguments(rest)), where)
    return [(where, list(args)) for args, where in unique.items()]


COMMANDS = documented_commands()


def test_the_commands_are_found():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    # README.md, pages of docs/ (by name) and comments of conf/
    assert {"README.md", "running.md", "scaling.md", "conf/data/hf.yaml"} <= where
    assert "conf/hydra/launcher/slurm.yaml" in where
    lines = [" ".join(args) for _, args in COMMANDS]
    assert "-m probes.pooling=mean,last" in lines  # README's sweep
    assert "probes.model_kwargs.alpha=[0.01,0.1]" in lines  # conf/probes/all_layers.yaml
    # continued lines are joined, comments and VAR=value prefixes left out
    ends = [args[-2:] for _, args in COMMANDS]
    assert ["hydra.job.name=train_node1", "hydra.output_subdir=null"] in ends


@pytest.fixture(scope="module", autouse=True)
def shipped_configs():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("args", [a for _, a in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_documented_command_composes(args, tmp_path, monkeypatch):
    overrides, multirun, i = [], False, 0
    while i < len(args):
        if args[i] in ("-m", "--multirun"):
            multirun = True
        elif args[i] in ("--config-dir", "-cd"):
            i += 1
            user = tmp_path / args[i]
            for name, text in USER_GROUPS.items():
                (user / name).parent.mkdir(parents=True, exist_ok=True)
                (user / name).write_text(text)
            overrides.append(f"hydra.searchpath=[file://{user}]")
        else:
            assert not args[i].startswith("-"), f"an option this test does not know: {args[i]}"
            overrides.append(args[i])
        i += 1
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
    assert multirun or not any(o.is_sweep_override() for o in parsed), "a sweep without -m"
    monkeypatch.chdir(tmp_path)
    for job in jobs:
        cfg = compose(config_name="train", overrides=job, return_hydra_config=True)
        assert cfg.probes.kind and cfg.model.name_or_path


def test_estimator_options_need_no_plus():
    cfg = compose(
        config_name="train",
        overrides=["probes.model_kwargs.alpha=0.01", "probes.model_kwargs.penalty=l1"],
    )
    assert dict(cfg.probes.model_kwargs) == {"alpha": 0.01, "penalty": "l1"}
    # the rest of the config still rejects keys it does not have (a typo)
    for typo in ("probes.model_kwarg.alpha=0.01", "probes.polling=last"):
        with pytest.raises(Exception, match="Could not override"):
            compose(config_name="train", overrides=[typo])
