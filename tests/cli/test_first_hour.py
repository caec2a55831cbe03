"""Issue 25 (the first hour, round 2): what a new user sees around a search: the interpret-mode caveat and the
time estimate of a CPU search (item 3), and the output polish of item 7."""
from __future__ import annotations

from click.testing import CliRunner

import autotune.cli.interpret_notice as notice
from autotune.cli.app import main
from autotune.measure.cost import INTERPRET_CAVEAT, first_trial_seconds
from autotune.shapes import spec_from_fields

README_FIRST_SEARCH = dict(batch=4, seq_len=2048, heads=16, kv_heads=2, head_dim=128, dtype="bfloat16", causal=True)
MAIN_JOB = dict(batch=1, seq_len=128, heads=2, kv_heads=1, head_dim=32, causal=True, segments=3)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def announce(fields: dict, capsys, monkeypatch, rate: float = 20e9, trials: int | None = 60) -> tuple[float, str]:
    monkeypatch.setattr(notice, "matmul_rate", lambda dtype: rate)  # a 2-core CPU's 512x512 matmul, about
    from autotune.options import TimingPolicy

    seconds = notice.announce_cpu_search([spec_from_fields(fields, "test")], trials=trials, timing=TimingPolicy(),
                                         shapes=None, given_flags=[])
    return seconds, capsys.readouterr().err


def test_a_huge_cpu_search_says_how_long_and_suggests_a_target(capsys, monkeypatch):
    """Item 3: the README's first search line had 0 of 60 trials after 90 s on a CPU and said nothing."""
    seconds, err = announce(README_FIRST_SEARCH, capsys, monkeypatch)
    assert seconds > 3600
    assert err.splitlines()[0] == INTERPRET_CAVEAT
    assert "This search will take about " in err and " h on this CPU" in err
    assert ("autotune search --target h100 --batch 4 --seq-len 2048 --heads 16 --kv-heads 2 --head-dim 128 "
            "--dtype bfloat16 --causal") in err


def test_a_small_cpu_search_gets_only_the_caveat(capsys, monkeypatch):
    seconds, err = announce(MAIN_JOB, capsys, monkeypatch, trials=8)
    assert seconds < 180 and err.strip() == INTERPRET_CAVEAT


def test_the_first_trial_estimate_grows_with_the_work():
    small = spec_from_fields(MAIN_JOB, "t").problem
    big = spec_from_fields(README_FIRST_SEARCH, "t").problem
    backward = spec_from_fields({**README_FIRST_SEARCH, "backward": True}, "t").problem
    rate = 20e9
    assert first_trial_seconds(small, rate) < 5 < 60 < first_trial_seconds(big, rate)
    assert first_trial_seconds(backward, rate) > 3 * first_trial_seconds(big, rate)


def test_bad_input_is_one_line_naming_the_flag_as_typed(tmp_path):
    """Items 6 and 7: click's two usage lines came before the message, and a rule between flags named the shapes
    file's fields (`kv_heads`) for values typed as flags; a TOML `[problem]` got no hint towards `[[problem]]`."""
    result = invoke("search", "--batch", "1", "--seq-len", "8", "--heads", "3", "--kv-heads", "2", "--head-dim", "8",
                    "--db", tmp_path / "r.db")
    assert result.exit_code == 2
    assert result.output == "Error: --kv-heads must divide --heads, got --heads=3 and --kv-heads=2\n"
    unknown = invoke("search", "--target", "v3", "--batch", "1", "--db", tmp_path / "r.db")
    assert unknown.exit_code == 2 and len(unknown.output.splitlines()) == 1 and "Usage:" not in unknown.output
    shapes = tmp_path / "one.toml"
    shapes.write_text("[problem]\nbatch = 1\n")
    single = invoke("search", "--shapes", shapes, "--db", tmp_path / "r.db")
    assert single.exit_code == 2 and "write each problem as [[problem]]" in single.output
    assert not (tmp_path / "r.db").exists()


def test_the_summary_says_once_how_winners_are_stored_and_when_an_offer_was_not_kept(capsys):
    """Item 7: `search --misses` printed one near-identical re-timing sentence per problem, and a second worker
    printed its own winner as if stored when the database kept a faster one."""
    from autotune.cli.search import print_summary
    from autotune.search.retime import SearchResult
    from autotune.keys import make_key
    from autotune.device import current_device
    from autotune.kernel_protocol import load_kernel

    def result(best_id: int, stored: bool):
        problem = spec_from_fields({**MAIN_JOB, "seq_len": 128 * best_id}, "t").problem
        key = make_key(load_kernel("gpu"), problem, current_device())
        return SearchResult(problem=problem, key=key, best_config={"block_q": 64, "block_k": 32}, best_time_s=2e-3,
                            default_time_s=3e-3, xla_time_s=None, trials_run=8, trials_failed=0, status_counts={},
                            implementation="pallas", times={"pallas": 2e-3}, wall_s=9.0, stored=stored,
                            best_trial_s=1.9e-3, best_id=best_id)

    print_summary([result(1, True), result(2, True), result(3, True), result(4, False)], None)
    out = capsys.readouterr().out
    assert out.count("final re-timing") == 1
    assert "#4: this worker's winner (block_k=32 block_q=64, 2.000 ms) was not kept" in out
    assert "autotune show --id 4" in out
    rows = [line for line in out.splitlines() if line.startswith("b1 q")]
    assert [row.split("  ")[-1].strip() for row in rows] == ["yes"] * 3 + ["no: a faster one is kept"]


def test_a_new_folder_for_the_database_is_said_aloud(tmp_path):
    """Item 7: a mistyped --db directory was created without a word."""
    import contextlib
    import io

    from autotune.cli.common import open_store

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        open_store(str(tmp_path / "typo" / "results.db")).close()
        open_store(str(tmp_path / "typo" / "results.db")).close()  # there now: nothing to say
    assert err.getvalue().count(f"Note: created the folder {tmp_path / 'typo'} for a new results database") == 1
