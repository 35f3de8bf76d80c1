"""Bad input: one clear sentence on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import Cli, Result, assert_clean_error, write_spec

BAD_SPECS = {
    "invalid-yaml": ("label: x\nsteps:\n  - runner: writer\n   params: {text: a}\n",
                     ["not valid YAML", "line 4"]),
    "unknown-runner": ("label: x\nsteps:\n  - runner: no_such_runner\n",
                       ["unknown runner", "no_such_runner"]),
    "unknown-param": ("label: x\nsteps:\n  - runner: writer\n    params: {colour: red}\n",
                      ["unknown param", "colour"]),
    "ill-typed-param": ("label: x\nsteps:\n  - runner: writer\n    params: {repeat: many}\n",
                        ["repeat", "integer"]),
    "param-below-minimum": ("label: x\nsteps:\n  - runner: writer\n    params: {repeat: 0}\n",
                            ["repeat"]),
    "cycle": ("label: x\npipeline:\n  - {id: a, runner: writer, inputs: [c]}\n"
              "  - {id: b, runner: join, inputs: [a]}\n  - {id: c, runner: join, inputs: [b]}\n",
              ["cycle", "a -> c -> b -> a"]),
    "steps-and-pipeline": ("label: x\nsteps:\n  - runner: writer\n"
                           "pipeline:\n  - {id: a, runner: writer}\n",
                           ["steps", "pipeline"]),
    "missing-label": ("steps:\n  - runner: writer\n", ["label"]),
    "empty-label": ("label: ''\nsteps:\n  - runner: writer\n", ["label"]),
    "unknown-input": ("label: x\npipeline:\n  - {id: a, runner: join, inputs: [ghost]}\n",
                      ["ghost"]),
    "duplicate-ids": ("label: x\npipeline:\n  - {id: a, runner: writer}\n"
                      "  - {id: a, runner: writer}\n", ["duplicate", "'a'"]),
    "escaping-id": ("label: x\npipeline:\n  - {id: ../evil, runner: writer}\n", ["../evil"]),
    "not-a-mapping": ("- just\n- a list\n", []),
    "invalid-json": ('{"label": "x", "steps": [}', ["not valid JSON", "line 1"]),
    "huge-priority": ("label: x\npriority: 100000000000000000000000\nsteps:\n"
                      "  - runner: writer\n", ["priority"]),
    "huge-negative-priority": ("label: x\npriority: -100000000000000000000000\nsteps:\n"
                               "  - runner: writer\n", ["priority"]),
    "huge-float-priority-json": ('{"label": "x", "priority": 1e23, '
                                 '"steps": [{"runner": "writer"}]}', ["priority"]),
}


JOB_COMMANDS = ["status", "logs", "outputs", "result", "cancel", "events", "wait"]


@pytest.fixture(scope="module")
def refused(shared_cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Every bad spec submitted, and every job command asked about an unknown job, all at
    once (they are independent; start-up time dominates)."""
    folder = tmp_path_factory.mktemp("bad-specs")
    calls: dict[str, list[str]] = {}
    for case, (text, _) in BAD_SPECS.items():
        suffix = ".json" if case.endswith("json") else ".yaml"
        calls[case] = ["submit", str(write_spec(folder, f"{case}{suffix}", text)), "--json"]
    for command in JOB_COMMANDS:
        calls[command] = [command, "0000000-nope", "--json"]
    return shared_cli.run_many(calls)


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_refused(refused: dict[str, Result], case: str) -> None:
    assert_clean_error(refused[case], *BAD_SPECS[case][1])


def test_missing_spec_file(shared_cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert_clean_error(shared_cli.run("submit", str(missing)), str(missing), "does not exist")


def test_unreadable_spec_files(shared_cli: Cli, tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe label: x\n")
    assert_clean_error(shared_cli.run("submit", str(binary)), str(binary), "UTF-8")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_clean_error(shared_cli.run("submit", str(empty)), str(empty), "empty")
    assert_clean_error(shared_cli.run("submit", str(tmp_path)), str(tmp_path), "directory")
    assert_clean_error(shared_cli.run("submit", "-", stdin=""), "<stdin>", "empty")


def test_bad_spec_on_stdin(shared_cli: Cli) -> None:
    assert_clean_error(shared_cli.run("submit", "-", stdin="label: [unclosed\n"),
                       "<stdin>", "not valid YAML")


def test_nothing_was_queued_by_bad_input(shared_cli: Cli, refused: dict[str, Result]) -> None:
    assert shared_cli.json("list") == []
    assert not (shared_cli.home / "worker.log").exists()  # no worker was started either


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_unknown_job_id(refused: dict[str, Result], command: str) -> None:
    assert_clean_error(refused[command], "no job", "0000000-nope")


def test_unknown_runner_name(shared_cli: Cli) -> None:
    assert_clean_error(shared_cli.run("runners", "show", "nope"), "no runner", "'nope'")


def test_missing_runner_file(shared_cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "gone.yaml"
    assert_clean_error(shared_cli.run("runners", "validate", str(missing)), str(missing))


def test_list_bogus_state(shared_cli: Cli) -> None:
    assert_clean_error(shared_cli.run("list", "--state", "bogus"), "bogus", "succeeded")


def test_bad_value_in_config_file(bare_cli: Cli) -> None:
    bare_cli.home.mkdir()
    config = bare_cli.home / "jobcell.toml"
    config.write_text('cpu_slots = "lots"\n')
    assert_clean_error(bare_cli.run("list"), str(config), "cpu_slots", "'lots'")
    config.write_text("cpu_slots = [\n")
    assert_clean_error(bare_cli.run("config", "show"), str(config), "not valid TOML")
    config.write_text("cpu_slot = 2\n")
    assert_clean_error(bare_cli.run("status", "x"), str(config), "unknown option", "cpu_slot")


def test_bad_value_in_environment(bare_cli: Cli) -> None:
    result = bare_cli.run("config", "show", env={"JOBCELL_CPU_SLOTS": "abc"})
    assert_clean_error(result, "JOBCELL_CPU_SLOTS", "cpu_slots", "'abc'")
    result = bare_cli.run("list", env={"JOBCELL_POLL_INTERVAL_S": "-1"})
    assert_clean_error(result, "JOBCELL_POLL_INTERVAL_S")


def test_unwritable_home(tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    cli = Cli(regular / "cell")
    assert_clean_error(cli.run("list"), "cell home", str(regular / "cell"))
    # The same through JOBCELL_HOME, with a home that is itself a regular file.
    assert_clean_error(cli.run("config", "show", home=False, env={"JOBCELL_HOME": str(regular)}),
                       "cell home", str(regular))


def test_runner_file_not_utf8(cli: Cli) -> None:
    broken = cli.home / "runners" / "latin1.yaml"
    broken.write_bytes(b"name: caf\xe9\ncommand: true\n")
    assert_clean_error(cli.run("runners", "validate", str(broken)), str(broken), "UTF-8")
    # One undecodable file must not take the whole registry down with it.
    listed = cli.json("runners", "list")
    assert "writer" in {r["name"] for r in listed["runners"]}
    assert str(broken) in listed["errors"]


UNBOUNDED_RUNNERS = {
    "infinite-timeout": ('resources: {timeout_s: .inf}\n', ["resources.timeout_s", "finite"]),
    "nan-timeout": ('resources: {timeout_s: .nan}\n', ["resources.timeout_s", "finite"]),
    "nul-in-env": ('env: {A: "x\\0y"}\n', ["env", "'A'", "NUL"]),
    "equals-in-env-name": ('env: {"A=B": "x"}\n', ["env", "'A=B'", "'='"]),
}


def unbounded_runner(folder: Path, case: str) -> Path:
    path = folder / f"{case}.yaml"
    path.write_text(f"name: {case}\ncommand: \"true\"\n{UNBOUNDED_RUNNERS[case][0]}",
                    encoding="utf-8")
    return path


def test_unbounded_or_unusable_runner_fields_are_refused(shared_cli: Cli,
                                                         tmp_path: Path) -> None:
    results = shared_cli.run_many({
        case: ["runners", "validate", str(unbounded_runner(tmp_path, case))]
        for case in UNBOUNDED_RUNNERS})
    for case, (_text, needles) in UNBOUNDED_RUNNERS.items():
        assert_clean_error(results[case], str(tmp_path / f"{case}.yaml"), *needles,
                           exit_code=1)


def test_runners_list_reports_an_unbounded_runner_file_and_goes_on(cli: Cli) -> None:
    folder = cli.home / "runners"
    broken = [unbounded_runner(folder, case) for case in ("infinite-timeout", "nul-in-env")]
    listed = cli.json("runners", "list")
    names = {r["name"] for r in listed["runners"]}
    assert "writer" in names and not names & {"infinite-timeout", "nul-in-env"}
    assert "timeout_s" in listed["errors"][str(broken[0])]
    assert "NUL" in listed["errors"][str(broken[1])]
    assert "writer" in cli.ok("runners", "list").stdout


def test_submit_tag_option_adds_to_null_or_listed_tags(cli: Cli, tmp_path: Path) -> None:
    null_tags = write_spec(tmp_path, "null-tags.yaml", """\
        label: tagged
        tags: null
        steps:
          - runner: writer
            params: {text: one}
        """)
    listed_tags = write_spec(tmp_path, "listed-tags.yaml", """\
        label: tagged
        tags: [a]
        steps:
          - runner: writer
            params: {text: two}
        """)
    first = cli.submit(null_tags, "--tag", "t")
    second = cli.submit(listed_tags, "--tag", "t", "--tag", "u")
    tags = {job["job_id"]: job["tags"] for job in cli.json("list")}
    assert tags == {first: ["t"], second: ["a", "t", "u"]}


def test_submit_tag_option_does_not_split_string_tags(cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "string-tags.yaml", """\
        label: tagged
        tags: "abc"
        steps:
          - runner: writer
        """)
    assert_clean_error(cli.run("submit", str(spec), "--tag", "t"), "tags")
    assert_clean_error(cli.run("submit", str(spec)), "tags")
    assert cli.json("list") == []


def test_submit_empty_label_option_is_refused_not_ignored(cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "labelled.yaml", """\
        label: from-the-file
        steps:
          - runner: writer
        """)
    assert_clean_error(cli.run("submit", str(spec), "--label", ""), "label")
    assert cli.json("list") == []
