"""The docs against the code, as text (no bench imported, nothing run): every test docs/errors.md names exists,
every repository path and link in README.md and docs/ exists inside the repository, every flag written after a
`bench/X.py` in one code span is defined by that bench, and the plan printout in docs/architecture.md is
format_plan's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nanomoe_fn import MOE_PROGRAM, format_plan, shared_expert_overlap, two_batch_overlap
from tests.helpers import ROOT

DOCS = ["README.md", "docs/architecture.md", "docs/errors.md"]
PATH = re.compile(r"(?<![\w./-])((?:bench|kernels|nanomoe_fn|reference|tests|docs|\.ci)/[\w./=,-]*\w)")


def text(doc: str) -> str:
    return (Path(ROOT) / doc).read_text()


def named_tests(doc: str) -> list[tuple[str, str | None]]:
    """(test file under tests/, test name or None) for every `test_x.py[::name]` in the doc."""
    found = re.findall(r"((?:tests/)?(?:gpu/)?test_\w+\.py)(?:::(test_\w+))?", text(doc))
    return [(f.removeprefix("tests/"), name or None) for f, name in found]


def missing_tests(doc: str) -> list[str]:
    bad = []
    for file, name in named_tests(doc):
        path = Path(ROOT) / "tests" / file
        if not path.is_file():
            bad.append(f"{file}: no such test file")
        elif name and not re.search(rf"^\s*(async )?def {name}\(", path.read_text(), re.M):
            bad.append(f"{file}::{name}: no such test")
    return bad


def missing_paths(doc: str) -> list[str]:
    """Repository paths (`bench/x.py`, `kernels/`, ...) that do not exist, `../` paths that leave the repository
    (such as ../shared), relative links that are broken."""
    body, root = text(doc), Path(ROOT).resolve()
    bad = [f"{p}: no such path" for p in sorted(set(PATH.findall(body))) if not (root / p).exists()]
    bad += [f"{p}: outside the repository" for p in sorted(set(re.findall(r"(?<![\w.])(?:\.\./)+[\w./-]*", body)))
            if not ((root / doc).parent / p).resolve().is_relative_to(root)]
    for link in sorted(set(re.findall(r"\]\(([^)#\s]+)", body))):
        target = ((root / doc).parent / link).resolve()
        if not re.match(r"[a-z]+://", link) and target.is_relative_to(root) and not target.exists():
            bad.append(f"{link}: broken link")
    return bad


def undefined_bench_flags(doc: str) -> list[str]:
    """`--flag`s written after `bench/X.py` inside one code span (or code block) that neither bench/X.py nor
    bench/common.py (the shared flags) defines."""
    bad = []
    common = (Path(ROOT) / "bench" / "common.py").read_text()
    for span in re.findall(r"```.*?```|`[^`]+`", text(doc), re.S):
        for script, rest in re.findall(r"bench/(\w+\.py)((?:[ \n]+(?!python|nanomoe|&&|#|\()[^ \n`]+)*)", span):
            source = (Path(ROOT) / "bench" / script).read_text() + common
            bad += [f"bench/{script} {flag}" for flag in re.findall(r"(?:^|\s)(--[a-z][\w-]*)", rest)
                    if f'"{flag}"' not in source]
    return bad


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_what_exists(doc):
    assert missing_tests(doc) == []
    assert missing_paths(doc) == []
    assert undefined_bench_flags(doc) == []


def test_errors_doc_names_a_test_in_most_rows():
    assert len({t for t in named_tests("docs/errors.md") if t[1]}) > 40  # the parser found the table's tests


def test_checkers_find_drift(tmp_path, monkeypatch):
    """The checkers on a made-up doc: a renamed test, a missing file, a link out of the repo, an unknown flag."""
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text("| a | b | test_cli.py::test_nope, test_nope_file.py |\n`kernels/nope.py` and "
                   "[up](../../outside.md), [gone](missing.md), [ok](https://example.com), see ../../shared/x.py\n"
                   "`python bench/bench_ep_moe.py --batch-size 8 --frobnicate 3`\n")
    for sub in ("tests", "bench"):
        (tmp_path / sub).symlink_to(Path(ROOT) / sub)
    monkeypatch.setattr("tests.test_docs_match.ROOT", str(tmp_path))
    assert missing_tests("docs/x.md") == ["test_cli.py::test_nope: no such test",
                                          "test_nope_file.py: no such test file"]
    assert missing_paths("docs/x.md") == ["kernels/nope.py: no such path", "../../outside.md: outside the repository",
                                          "../../shared/x.py: outside the repository", "missing.md: broken link"]
    assert undefined_bench_flags("docs/x.md") == ["bench/bench_ep_moe.py --frobnicate"]


def test_architecture_plan_printout_is_format_plans():
    block = re.search(r"prints what runs when:\n\n```\n(.*?)```", text("docs/architecture.md"), re.S)
    assert block is not None
    got = "\n".join(line.rstrip() for line in format_plan(two_batch_overlap(shared_expert_overlap(MOE_PROGRAM)))
                    .splitlines())
    assert block[1].rstrip("\n") == got
