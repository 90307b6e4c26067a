"""The README and the pages of docs/ are tested as printed.

* Every fenced ```python block runs: the blocks of one page in order, in one namespace, as a
  reader would paste them. A block that is not meant to run is marked `<!-- not-run -->` on
  the line before it; it must still compile, and there may only be a few. docs/oracles.md is
  executed (and checked against what its text says) by tests/test_docs_oracles.py.
* Every command shown (fenced bash blocks, `$ ` lines of text blocks, inline code that starts
  with `blackbox-zo `) is checked without running anything: `blackbox-zo ...` parses with the
  CLI's own parser and names an existing problem, oracle or experiment; `train` resolves its
  `--set` keys against the problem's config model; an experiment's flags appear in its
  `--help`; `make` targets exist; a benchmark script exists and defines the flags shown;
  `tensorboard ...` and `mlflow ...` parse with those tools' own parsers.
* Every relative link between the README and docs/ resolves, anchors included.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXECUTED_ELSEWHERE = {ROOT / "docs" / "oracles.md"}  # its Python runs in tests/test_docs_oracles.py
MAX_NOT_RUN = 3  # non-runnable snippets are the exception; keep them few

FENCE = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`((?:blackbox-zo|torchrun|make|python|\.venv/bin/python)(?: [^`]*)?)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_-]*$")  # NAME, PROBLEM, ORACLE, RUN_DIR: stand for any name


@dataclass
class Block:
    page: Path
    lang: str
    code: str
    marker: str | None
    line: int

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, m["lang"], m["code"], m["marker"], text.count("\n", 0, m.start("code")))
            for m in FENCE.finditer(text)]


def prose(page: Path) -> str:
    """The page without its fenced blocks (links and inline code live here)."""
    return FENCE.sub("", page.read_text())


# ------------------------------------------------------------------ python examples run


def test_readme_python_example_runs_and_is_right(capsys):
    code = next(b.code for b in page_blocks(README) if b.lang == "python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    est, oracle = scope["est"], scope["oracle"]
    # Rosenbrock gradient at (0.5, 0.5) is (-51, 50); float32 central differences with mu = 1e-4
    # lose ~ eps * f / mu ~ 1e-7 * 1 / 1e-4 = 1e-3 relative per loss value, so allow 0.1 absolute.
    torch.testing.assert_close(est.grad, torch.tensor([-51.0, 50.0]), atol=0.1, rtol=0)
    assert est.queries == 4 and oracle.ledger.counts["train"] == 4
    assert "OK" in capsys.readouterr().out


RUNNABLE_PAGES = [p for p in PAGES if p not in EXECUTED_ELSEWHERE
                  and any(b.lang == "python" for b in page_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page, capsys):
    torch.manual_seed(0)
    scope: dict = {"__name__": f"docs_{page.stem}"}
    for b in page_blocks(page):
        if b.lang != "python":
            continue
        code = compile(b.code, b.where(), "exec")  # a snippet that does not even parse fails here
        if b.marker == "not-run":
            continue
        exec(code, scope)


def test_non_runnable_snippets_are_marked_and_few():
    not_run = [b for p in PAGES for b in page_blocks(p) if b.marker == "not-run"]
    assert all(b.lang == "python" for b in not_run), [b.where() for b in not_run if b.lang != "python"]
    assert len(not_run) <= MAX_NOT_RUN, f"{len(not_run)} python blocks are marked not-run: make them runnable"


def test_the_estimator_example_prints_what_the_text_claims(capsys):
    """docs/estimators.md: CGE and the exact-solve linear interpolation recover the gradient."""
    page = ROOT / "docs" / "estimators.md"
    code = next(b.code for b in page_blocks(page) if b.lang == "python" and "Quadratic" in b.code)
    exec(compile(code, str(page), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    cosines = {i: float(line.rsplit(" ", 1)[1]) for i, line in enumerate(lines)}
    # a quadratic's forward difference is exact up to mu * A_jj / 2 <= 2.5e-4 per coordinate (float64)
    assert cosines[0] > 0.9999 and cosines[1] > 0.9999 and cosines[3] > 0.9999, lines
    assert cosines[2] < 0.99 and cosines[4] < 0.99, lines  # q = d RGE and m = d/2 LASSO are estimates only


# ------------------------------------------------------------------ commands are real


def test_readme_quickstart_has_exactly_the_two_commands():
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


@dataclass
class Command:
    where: str
    argv: list[str]
    error: str | None = None  # the one-line error the docs show right after it
    inline: bool = False


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def _command_words(line: str) -> list[str]:
    """The words of a shell command line, without an output redirection (`> my.toml`)."""
    words = shlex.split(line)
    return words[: words.index(">")] if ">" in words else words


def shown_commands(page: Path) -> list[Command]:
    out = []
    for b in page_blocks(page):
        if b.lang == "bash" and b.marker != "plugin-commands":  # plugin-commands: run by tests/test_plugins.py
            joined = b.code.replace("\\\n", " ")
            for i, line in enumerate(joined.splitlines()):
                line = _strip_comment(line)
                if line:
                    out.append(Command(f"{b.where()}+{i}", _command_words(line)))
        elif b.lang == "text":
            lines = b.code.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("$ "):
                    nxt = lines[i + 1] if i + 1 < len(lines) else ""
                    out.append(Command(f"{b.where()}+{i}", shlex.split(line[2:]),
                                       nxt if nxt.startswith("blackbox-zo: error:") else None))
    for m in INLINE_COMMAND.finditer(prose(page)):
        out.append(Command(f"{page.relative_to(ROOT)} `{m[1]}`", shlex.split(m[1]), inline=True))
    return out


def guide_defined_names(page: Path) -> set[str]:
    """Oracles and simulators a page defines itself (an example's `name = "..."`, a plug-in's entry point)."""
    names = set()
    for b in page_blocks(page):
        if b.lang == "python":
            names |= set(re.findall(r'^\s+name = "([\w.-]+)"', b.code, re.M))
        if b.lang == "toml":
            names |= set(re.findall(r'^([\w.-]+) = "[\w.]+:\w+"', b.code, re.M))
    return names


@lru_cache(maxsize=None)
def experiment_help(name: str) -> str:
    from blackbox_zo.problem import get_experiment

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        get_experiment(name)(["--help"])
    return buf.getvalue()


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_blackbox_zo(cmd: Command, argv: list[str], own_names: set[str]) -> None:
    from blackbox_zo.cli import build_parser
    from blackbox_zo.config import ConfigError, resolve_config
    from blackbox_zo.oracle import available_oracles
    from blackbox_zo.problem import OracleProblem, available_experiments, available_problems, get_problem
    from blackbox_zo.registry import SIMULATORS

    parser = build_parser()
    if cmd.inline and len(argv) <= 1:  # `blackbox-zo` or `blackbox-zo train`: a name, not a command
        choices = parser._subparsers._group_actions[0].choices
        assert not argv or argv[0] in choices, f"{cmd.where}: no subcommand {argv[0]!r}"
        return
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{cmd.where}: blackbox-zo {' '.join(argv)} does not parse: {err.getvalue().strip()}")
    if args.command == "check-oracle":
        assert PLACEHOLDER.match(args.name) or args.name in available_oracles() or args.name in own_names, \
            f"{cmd.where}: no oracle {args.name!r}"
    elif args.command == "check-simulator":
        assert PLACEHOLDER.match(args.name) or args.name in SIMULATORS or args.name in own_names, \
            f"{cmd.where}: no simulator {args.name!r}"
    elif args.command == "experiment":
        assert args.name in available_experiments(), f"{cmd.where}: no experiment {args.name!r}"
        shown = {a.split("=", 1)[0] for a in args.args if a.startswith("--")}
        flags = set(re.findall(r"--[\w-]+", experiment_help(args.name)))
        assert shown <= flags, f"{cmd.where}: experiment {args.name} has no flag(s) {sorted(shown - flags)}"
    elif args.command == "train" and not PLACEHOLDER.match(args.problem):
        known = args.problem in available_problems() or args.problem in available_oracles()
        if not known and args.problem in own_names:  # an oracle the page itself defines
            problem = OracleProblem(args.problem)
        else:
            try:
                problem = get_problem(args.problem)
            except LookupError as exc:
                pytest.fail(f"{cmd.where}: {exc}")
        if cmd.error is not None:  # the docs show the error this command gives: it must be the CLI's
            with contextlib.redirect_stderr(io.StringIO()) as err:  # args.fn: main() minus the allocator tuning
                assert args.fn(args) == 2, f"{cmd.where}: expected exit status 2"
            assert err.getvalue().strip() == cmd.error, f"{cmd.where}: the docs show {cmd.error!r}"
            return
        # a simulator the page itself defines (a plug-in's entry point) is not registered here
        settings = [a for a in args.set if not (a.startswith("sol.simulator=") and a.split("=", 1)[1] in own_names)]
        try:
            resolve_config(problem.config_model, problem.default_config(), None, settings)
        except ConfigError as exc:
            pytest.fail(f"{cmd.where}: {exc}")


def check_command(cmd: Command, own_names: set[str]) -> None:
    argv = cmd.argv
    if cmd.inline and len(argv) == 1 and argv[0] != "blackbox-zo":  # `make`, `torchrun`: a tool's name
        return
    if argv[0] == "blackbox-zo":
        check_blackbox_zo(cmd, argv[1:], own_names)
    elif argv[0] == "torchrun":  # torchrun ... -m blackbox_zo ARGS, or ... --no-python blackbox-zo ARGS
        rest = argv[argv.index("blackbox_zo") + 1:] if "blackbox_zo" in argv else argv[argv.index("blackbox-zo") + 1:]
        check_blackbox_zo(cmd, rest, own_names)
    elif argv[0] == "make":
        targets = [a for a in argv[1:] if "=" not in a]
        assert targets and set(targets) <= make_targets(), f"{cmd.where}: no make target {targets}"
    elif argv[0] in ("python", ".venv/bin/python") and argv[1].startswith("benchmarks/"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{cmd.where}: no {argv[1]}"
        source = script.read_text()
        for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{cmd.where}: {argv[1]} defines no {flag}"
    elif argv[0] == "tensorboard":  # parsed by TensorBoard's own flags (nothing is started)
        program = pytest.importorskip("tensorboard.program")
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                program.TensorBoard().configure(argv=argv)
        except (SystemExit, ValueError) as exc:
            pytest.fail(f"{cmd.where}: {' '.join(argv)} is not a TensorBoard command line: {exc} {err.getvalue()}")
    elif argv[0] == "mlflow":  # parsed by MLflow's own click command (nothing is started)
        mlflow_cli = pytest.importorskip("mlflow.cli")
        import click

        try:
            group = mlflow_cli.cli
            with group.make_context("mlflow", list(argv[1:]), resilient_parsing=True) as ctx:
                sub = group.get_command(ctx, argv[1])
                assert sub is not None, f"{cmd.where}: mlflow has no command {argv[1]!r}"
                sub.make_context(argv[1], list(argv[2:]))
        except click.exceptions.ClickException as exc:
            pytest.fail(f"{cmd.where}: {' '.join(argv)} is not an MLflow command line: {exc}")
    else:
        pytest.fail(f"{cmd.where}: a command this test cannot check: {' '.join(argv)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_is_real(page):
    own = guide_defined_names(page)
    commands = shown_commands(page)
    for cmd in commands:
        check_command(cmd, own)


def test_the_command_checks_catch_mistakes():
    """The checker itself: a wrong key, a wrong value, an unknown name or flag each fail."""
    wrong = ["blackbox-zo train digits --set optimizer.lrr=0.1",
             "blackbox-zo train digits --set sparsity.ranking=smallest",
             "blackbox-zo train digitz",
             "blackbox-zo check-oracle no-such-oracle-v1",
             "blackbox-zo experiment pruning --no-such-flag",
             "blackbox-zo trian digits",
             "make no-such-target",
             "python benchmarks/bench_cge.py --no-such-flag",
             "pip install something"]
    for line in wrong:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command(Command("test", shlex.split(line)), set())


# ------------------------------------------------------------------ links resolve


def github_slugs(page: Path) -> set[str]:
    slugs, seen = set(), {}
    for title in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest == ROOT or ROOT in dest.parents, f"{page.name}: {target} points outside the repository"
        if not dest.exists() and dest == ROOT / "docs" / "reliability.md":
            continue  # written on another branch; the lead checks this one link at the merge
        assert dest.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert dest.suffix == ".md" and anchor in github_slugs(dest), f"{page.name}: no heading #{anchor} in {path or page.name}"


def test_docs_point_at_nothing_a_user_does_not_have():
    for page in PAGES:
        text = page.read_text()
        assert "shared/" not in text, f"{page.name}: a path outside the repository (cite papers by title and arXiv id)"
        assert not re.search(r"\b(?:issue|stop) \d+\b|<!-- section:", text), f"{page.name}: a tracker marker"


def test_the_link_check_catches_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n## Feature reuse (bench_cge)\n\n```bash\n# not a heading\n```\n")
    assert github_slugs(page) == {"results", "feature-reuse-bench_cge"}


# ------------------------------------------------------------------ numbers the docs state about the code


def test_the_digits_numbers_in_the_docs_match_the_model():
    """docs/digits.md states the CNN's parameter count and a dense forward-CGE step's queries."""
    from blackbox_zo.estimators import CGE
    from oracles.model_loss import ModelLossOracle
    from problems.digits import make_digits_cnn

    text = (ROOT / "docs" / "digits.md").read_text()
    params = int(re.search(r"\*\*([\d,]+) parameters\*\*", text)[1].replace(",", ""))
    queries = int(re.search(r"dense forward-CGE step costs d \+ 1 = ([\d,]+) queries", text)[1].replace(",", ""))
    torch.manual_seed(0)
    module = make_digits_cnn(8)
    assert sum(p.numel() for p in module.parameters()) == params
    oracle = ModelLossOracle(module, torch.nn.functional.cross_entropy)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    est = CGE(mu=5e-3).estimate(oracle, oracle.initial_theta(), (x, y))
    assert est.queries == queries == oracle.ledger.counts["train"]
