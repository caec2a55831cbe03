"""The problem's fields from one table (issue 26): flags, shapes files, bounds, the tune command and the lookup hint.

Issue 25: problem flags given beside --shapes apply to each entry (its own field wins), and the search's "In Python:"
hint carries every field of the stored key, so the printed lookup finds it. Issue 24: a window past its bound and a
JSON shapes file with a duplicate key are refused (exit 2, one line) before anything is written.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import autotune
from autotune.cli.app import main
from autotune.device import current_device
from autotune.keys import make_key
from autotune.problem_fields import FIELDS, command_flags, describe, lookup_arguments
from autotune.shapes import check_fields, load_shapes
from db import Store
from kernels import Problem, gpu
from tests import toy_kernel

TOY = "tests.toy_kernel"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error"), result.output
    return lines[-1]


def a_featured_problem(rng: random.Random) -> Problem:
    """A problem with every field away from its default, fresh each run."""
    kv_heads = rng.choice([1, 2])
    return Problem(batch=rng.randint(1, 4), q_len=rng.choice([32, 64]), kv_len=rng.choice([32, 96]),
                   heads=kv_heads * rng.randint(2, 3), kv_heads=kv_heads, head_dim=16, dtype="bfloat16",
                   causal=True, segments=True, backward=True, window_left=rng.randint(1, 40), window_right=None,
                   softcap=round(rng.uniform(5, 50), 3), lengths=True)


def test_flags_beside_a_shapes_file_fill_each_entry_and_the_entry_wins(tmp_path: Path):
    shapes = tmp_path / "shapes.toml"
    shapes.write_text("[[problem]]\nbatch = 1\nseq_len = 64\nheads = 2\nhead_dim = 16\n\n"
                      "[[problem]]\nbatch = 2\nseq_len = 32\nheads = 2\nhead_dim = 16\ncausal = false\n"
                      "window = [4, -1]\ndtype = \"float16\"\n")
    flags = check_fields({"backward": True, "causal": True, "window": "16,0", "dtype": "bfloat16", "softcap": 30.0,
                          "lengths": True}, "flags")
    first, second = (spec.problem for spec in load_shapes(shapes, defaults=flags))
    assert (first.backward, first.causal, first.window, first.dtype, first.softcap, first.lengths) == \
        (True, True, (16, 0), "bfloat16", 30.0, True)
    assert (second.backward, second.causal, second.window, second.dtype, second.softcap) == \
        (True, False, (4, None), "float16", 30.0)  # its own causal, window and dtype won


def test_flags_beside_a_shapes_file_can_give_a_required_field(tmp_path: Path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"seq_len": 32, "heads": 2, "head_dim": 16}, {"batch": 3, "seq_len": 64,
                                                                                "heads": 1, "head_dim": 16}]))
    specs = load_shapes(shapes, defaults=check_fields({"batch": 5}, "flags"))
    assert [spec.problem.batch for spec in specs] == [5, 3]


@pytest.mark.parametrize("args, named, bound", [
    (["--window", "2147483648"], "'--window'", "at most 1048576"),
    (["--window", "8,2147483648"], "'--window'", "at most 1048576"),
    (["--softcap", "1e39"], "'--softcap'", "at most 1e+38"),
])
def test_problem_flags_past_their_bound_are_refused_naming_it(tmp_path: Path, args, named, bound):
    db = tmp_path / "new.db"
    result = invoke("search", "--batch", 1, "--seq-len", 32, "--heads", 1, "--head-dim", 16, *args,
                    "--kernel", TOY, "--quiet", "--db", db)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert named in line and bound in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field", [f for f in FIELDS if f.kind in ("size", "count")], ids=lambda f: f.name)
def test_every_size_flag_takes_its_bound_from_the_table(tmp_path: Path, field):
    flags = {"--batch": 1, "--seq-len": 32, "--heads": 1, "--head-dim": 16, field.flag: int(field.maximum) + 1}
    result = invoke("search", *[x for pair in flags.items() for x in pair], "--kernel", TOY, "--quiet",
                    "--db", tmp_path / "new.db")
    assert result.exit_code == 2, result.output
    assert f"'{field.flag}': must be at most {int(field.maximum)}" in one_line_error(result)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, text, expected", [
    ("window.toml", "[[problem]]\nbatch = 1\nseq_len = 32\nheads = 1\nhead_dim = 16\nwindow = [2147483648, 0]\n",
     "window.toml: problem 1: field 'window': each side must be at most 1048576"),
    ("twice.json", '[{"batch": 1, "seq_len": 32, "heads": 1, "head_dim": 16, "batch": 4}]',
     "duplicate key 'batch'"),
    ("nested.json", '{"problems": [{"batch": 1, "seq_len": 32, "heads": 1, "head_dim": 16}], "problems": []}',
     "duplicate key 'problems'"),
])
def test_bad_shapes_files_are_refused_before_anything_is_written(tmp_path: Path, name, text, expected):
    shapes = tmp_path / name
    shapes.write_text(text)
    result = invoke("search", "--shapes", shapes, "--backward", "--kernel", TOY, "--quiet", "--db",
                    tmp_path / "new.db")
    assert result.exit_code == 2, result.output
    assert expected in one_line_error(result)
    assert os.listdir(tmp_path) == [name]


def test_the_help_says_flags_apply_to_a_shapes_file():
    for command in ("search", "bench"):
        text = " ".join(invoke(command, "--help").output.split())
        assert "Problem flags given beside it apply to each of its problems" in text
        assert "[1<=x<=65536]" in text  # --batch's bound, from the table


def test_the_printed_lookup_and_tune_command_find_the_stored_key(tmp_path: Path):
    """What the search's summary prints (lookup's arguments) and what the runtime's warning prints (the search
    flags) both name exactly the key stored, for a problem with every field away from its default."""
    problem = a_featured_problem(random.Random())
    db = tmp_path / "r.db"
    key = make_key(toy_kernel, problem, current_device())
    config = toy_kernel.Config.default(problem).to_dict()
    with Store(db) as store:
        store.put_best(key, config=config, time_s=1e-3, default_time_s=2e-3, trials=1)
    hint = f"autotune.lookup({lookup_arguments(key)}, kernel={TOY!r})"
    autotune.reload()
    try:
        with autotune.using(db=str(db)):
            found = eval(hint, {"autotune": autotune})  # noqa: S307 - the text our own summary prints
    finally:
        autotune.reload()
    assert found.source == "tuned" and found.key == key and found.config.to_dict() == config
    shown = invoke("show", *" ".join(command_flags(key)).split(), "--kernel", TOY, "--json", "--db", db)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["digest"] == key.digest()


def test_descriptions_name_every_field_away_from_its_default():
    problem = a_featured_problem(random.Random())
    text = describe(problem)
    assert re.fullmatch(rf"b{problem.batch} q{problem.q_len} kv{problem.kv_len} h{problem.heads}/{problem.kv_heads} "
                        rf"d16 bfloat16 causal seg \+bwd win\({problem.window_left},-\) cap\S+ len", text), text
    assert describe(Problem(batch=1, q_len=8, kv_len=8, heads=1, kv_heads=1, head_dim=8)) == \
        "b1 q8 kv8 h1/1 d8 float32"
    assert describe(make_key(gpu, problem, current_device())) == text  # a key reads as its problem


@pytest.mark.slow
def test_a_shapes_search_with_flags_stores_the_key_its_printed_lookup_finds(tmp_path: Path):
    """The README's `search --shapes shapes.toml --backward`: the flags reach every entry (the entry's own causal
    wins), the stored key carries them, and the summary's "In Python:" line, run as printed, finds it."""
    shapes = tmp_path / "shapes.toml"
    shapes.write_text("[[problem]]\nbatch = 1\nseq_len = 32\nheads = 1\nhead_dim = 16\ncausal = false\n")
    db = tmp_path / "r.db"
    run = invoke("search", "--shapes", shapes, "--backward", "--causal", "--window", "8,0", "--softcap", 20,
                 "--lengths", "--kernel", TOY, "--trials", 1, "--samples", 3, "--no-xla", "--quiet", "--seed", 1,
                 "--db", db)
    assert run.exit_code == 0, run.output
    assert ("Applying --causal --backward --window 8,0 --softcap 20 --lengths to every problem of "
            f"{shapes} (a problem's own field wins)") in run.output
    with Store(db) as store:
        [best] = store.bests()
    key = best.key
    assert (key.backward, key.causal, key.window_left, key.window_right, key.softcap, key.lengths) == \
        (True, False, 8, 0, 20.0, True)
    [hint] = [line.removeprefix("In Python: ") for line in run.output.splitlines() if line.startswith("In Python: ")]
    namespace = {"autotune": autotune}
    autotune.reload()
    try:
        exec(hint.replace("autotune.lookup(", "found = autotune.lookup(", 1), namespace)  # noqa: S102 - as printed
    finally:
        autotune.configure()
        autotune.reload()
    assert namespace["found"].source == "tuned" and namespace["found"].key == key


def test_lookup_takes_each_field_the_hint_passes_as_a_keyword():
    """`autotune.lookup`'s signature is written out for its readers; the hint passes every field that is not a
    shape or the dtype as a keyword, so the two must agree (`kernel` and `device_kind` say where to look, not what
    the problem is)."""
    parameters = inspect.signature(autotune.lookup).parameters.values()
    keywords = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in ("kernel", "device_kind")]
    assert keywords == [field.name for field in FIELDS if not field.size and field.name != "dtype"]
