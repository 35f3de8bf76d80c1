"""`jobcell run`: a session-plane runner inline, as a user drives it."""

from __future__ import annotations

import textwrap

from .helpers import Cli, assert_clean_error

GREET = textwrap.dedent("""\
    name: greet
    plane: session
    command: python3
    args_template: ["-c", "import json, sys; json.dump({{'hi': sys.argv[1], 'n': int(sys.argv[2])}}, open(sys.argv[3] + '/output.json', 'w'))",
                    "{name}", "{n}", "{output_dir}"]
    params:
      name: {type: string}
      n: {type: integer, default: 1}
    resources: {timeout_s: 20}
""")  # noqa: E501


def test_run_prints_the_value_and_queues_nothing(cli: Cli) -> None:
    (cli.home / "runners" / "greet.yaml").write_text(GREET)
    answer = cli.json("run", "greet", "-p", "name=it's $(x); `y`", "--param", "n=3")
    assert answer["succeeded"] is True
    assert answer["value"] == {"hi": "it's $(x); `y`", "n": 3}
    human = cli.ok("run", "greet", "-p", "name=Ada")
    assert '"hi": "Ada"' in human.stdout
    assert cli.json("list") == []


def test_run_refuses_bad_calls_with_one_sentence(cli: Cli) -> None:
    (cli.home / "runners" / "greet.yaml").write_text(GREET)
    assert_clean_error(cli.run("run", "greet"), "missing required param 'name'")
    assert_clean_error(cli.run("run", "greet", "-p", "name"), "must look like key=value")
    assert_clean_error(cli.run("run", "greet", "-p", "name=x", "-p", "n=two"),
                       "expected integer")
    assert_clean_error(cli.run("run", "writer"), "artifact-plane runner")
