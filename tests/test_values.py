"""Values: Helm's merge and --set rules, schema errors with key paths, exit 2, no traceback."""

from __future__ import annotations


import pytest

from support import run_cli
from trainer.errors import UserError
from trainer.chart import values_schema
from trainer.config import trainer_config_from_values
from trainer.values import parse_set, resolve_values


def test_later_values_files_win(values_file):
    first = values_file({"training": {"batchSize": 16, "epochs": 5}, "job": {"nodes": 3}})
    second = values_file({"training": {"batchSize": 8}})
    values = resolve_values([first, second])
    assert values["training"]["batchSize"] == 8  # later file wins
    assert values["training"]["epochs"] == 5  # maps merge key by key
    assert values["job"]["nodes"] == 3
    assert values["training"]["optimizer"]["name"] == "adamw"  # chart default kept


def test_set_wins_over_files_and_types_like_helm(values_file):
    path = values_file({"training": {"batchSize": 16}})
    values = resolve_values([path], ["training.batchSize=4,metrics.enabled=false"],
                            ["image.tag=007"], ['training.optimizer.lr=0.01'])
    assert values["training"]["batchSize"] == 4
    assert values["metrics"]["enabled"] is False
    assert values["image"]["tag"] == "007"
    assert values["training"]["optimizer"]["lr"] == 0.01


@pytest.mark.parametrize("expr, expected", [
    ("a=1", {"a": 1}),
    ("a=0", {"a": 0}),
    ("a=007", {"a": "007"}),  # a leading zero keeps a string, as in Helm
    ("a=1.5", {"a": "1.5"}),  # Helm --set never makes floats
    ("a=true,b=FALSE", {"a": True, "b": False}),
    ("a=null", {"a": None}),
    ("a.b.c=x", {"a": {"b": {"c": "x"}}}),
    ("a={x,2}", {"a": ["x", 2]}),
    ("a[1]=z", {"a": [None, "z"]}),
    (r"a=x\,y", {"a": "x,y"}),
    (r"a\.b=1", {"a.b": 1}),
])
def test_set_parsing_follows_helm_strvals(expr, expected):
    assert parse_set([expr]) == expected


def test_null_removes_a_key():
    values = resolve_values(set_values=["training.options=null"])
    assert "options" not in values["training"]


def _assert_user_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("sets, needle", [
    (["job.nodes=0"], "job.nodes"),
    (["training.batchSize=big"], "training.batchSize"),
    (["training.bogus=1"], "Additional property bogus"),
    (["training.precision=fp8"], "training.precision"),
    (["checkpoint.uri=ftp://x"], "checkpoint.uri"),
    (["checkpoint.uri=s3:///runs"], "checkpoint.uri: 's3:///runs' is not valid: file:///path or s3://bucket/prefix"),
    (["resources.cpu=lots"], "resources.cpu: 'lots' is not valid: a non-negative Kubernetes quantity of CPU"),
    (["resources.cpu=-1"], "resources.cpu: -1 is less than the minimum of 0"),
    (["resources.memory=4GB"], "resources.memory: '4GB' is not valid: a non-negative Kubernetes quantity of memory"),
    # Helm's own message here is "Invalid type. Expected: integer, given: string": say what to type.
    (["job.nodes=2.5"], "job.nodes: '2.5' is not a whole number: this key takes an integer, e.g. 2 or 3"),
])
def test_bad_values_exit_2_naming_the_key(tmp_path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    _assert_user_error(run_cli("run", "bad", "--workdir", str(tmp_path / "w"), *args), needle)
    assert not (tmp_path / "w").exists(), "nothing is written for rejected values"


def test_a_set_decimal_points_to_set_json(tmp_path):
    # Helm's --set never makes floats; the message says what to type instead.
    result = run_cli("run", "bad", "--workdir", str(tmp_path / "w"), "--set", "training.optimizer.lr=0.01")
    _assert_user_error(result, "training.optimizer.lr", "--set-json")
    assert run_cli("run", "ok", "--workdir", str(tmp_path / "ok"), "--set-json", "training.optimizer.lr=0.01",
                   "--set", "job.nodes=1,training.maxSteps=1,training.data.trainSamples=128",
                   "--set", "training.data.evalSamples=16,metrics.enabled=false").returncode == 0


def test_a_quoted_count_says_how_to_pass_a_number(tmp_path):
    result = run_cli("run", "bad", "--workdir", str(tmp_path / "w"), "--set-string", "job.nodes=2")
    _assert_user_error(result, "job.nodes: '2' is a string, not an integer", "use --set job.nodes=2")


def test_set_descends_into_what_a_file_gave(values_file):
    path = values_file({"tolerations": [{"key": "gpu", "operator": "Exists"}], "podLabels": {"team": "a"}})
    values = resolve_values([path], ["tolerations[0].effect=NoSchedule,podLabels.owner=b"])
    assert values["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert values["podLabels"] == {"team": "a", "owner": "b"}


def test_set_inside_a_null_names_the_key(values_file):
    path = values_file({"podSecurityContext": None})
    with pytest.raises(UserError, match=r"podSecurityContext is null .* not a map"):
        resolve_values([path], ["podSecurityContext.runAsUser=5"])


def test_every_violation_is_reported_at_once(tmp_path):
    result = run_cli("run", "bad", "--workdir", str(tmp_path), "--set", "job.nodes=0,training.epochs=-1")
    _assert_user_error(result, "job.nodes", "training.epochs")


def test_wrong_type_in_a_values_file(values_file, tmp_path):
    path = values_file({"job": {"nprocPerNode": "auto"}})
    _assert_user_error(run_cli("run", "bad", "-f", str(path), "--workdir", str(tmp_path / "w")),
                       "job.nprocPerNode")


def test_missing_and_malformed_files_name_the_file(tmp_path):
    _assert_user_error(run_cli("run", "x", "-f", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    _assert_user_error(run_cli("run", "x", "-f", str(broken)), "broken.yaml", "not valid YAML")


@pytest.mark.parametrize("name, sets", [
    ("a" * 54, []),  # Helm's release-name limit
    ("a" * 53, ["job.nodes=102"]),  # the last worker's pod name would pass 63 characters
    ("ends-with-dash-", []),
    ("ports", ["job.masterPort=9401,job.nprocPerNode=2"]),
])
def test_run_refuses_what_render_refuses_with_the_same_message(tmp_path, name, sets):
    args = [a for s in sets for a in ("--set", s)]
    rendered = run_cli("render", name, *args)
    ran = run_cli("run", name, "--workdir", str(tmp_path / "w"), *args)
    _assert_user_error(rendered)
    _assert_user_error(ran, rendered.stderr.strip())
    assert not (tmp_path / "w").exists()


def test_bad_experiment_name_is_refused(tmp_path):
    _assert_user_error(run_cli("run", "Bad_Name", "--workdir", str(tmp_path / "w")), "Bad_Name", "DNS-1035")


@pytest.mark.parametrize("verb", ["run", "render", "submit"])
@pytest.mark.parametrize("sets, needle", [
    ("training.task=nope", "training.task: 'nope' is not one of ['bert-sentiment', 'causal-lm', 'cifar10-convnet', 'custom'"),
    ("training.task=cifar10-convnet,training.data.source=imagenet", "cifar10-convnet reads synthetic or cifar10"),
    ("training.task=bert-sentiment,training.numClasses=3", "bert-sentiment on synthetic data has 2 classes"),
    ("training.task=custom", "training.task custom needs training.entrypoint"),
])
def test_what_a_task_cannot_run_fails_before_anything_starts(tmp_path, verb, sets, needle):
    """Exit 2 with one message: no process started, no workdir written, nothing sent to a cluster
    (submit here has no cluster to reach, so getting past validation would fail differently)."""
    workdir = ["--workdir", str(tmp_path / "w")] if verb == "run" else []
    env = {"KUBECONFIG": str(tmp_path / "no-such-kubeconfig")}
    result = run_cli(verb, "x", *workdir, "--set", sets, env=env)
    _assert_user_error(result, needle)
    assert result.stdout == "" and result.stderr.count("\n- ") == 1, result.stderr
    assert not (tmp_path / "w").exists()


def test_the_registered_tasks_are_the_schema_s():
    from trainer.tasks import task_names
    schema = values_schema()["properties"]["training"]
    assert sorted(schema["properties"]["task"]["enum"]) == task_names()  # custom is registered too
    ruled = {rule["if"]["properties"]["task"]["const"] for rule in schema["allOf"]}
    assert ruled == set(task_names()), "every task has its rule (sources, defaults)"


def test_switching_task_takes_the_task_s_defaults():
    config = trainer_config_from_values("x", resolve_values(set_values=["training.task=bert-sentiment"]))
    assert config.training.num_classes == 2
    config = trainer_config_from_values("x", resolve_values(set_values=["training.numClasses=7"]))
    assert config.training.num_classes == 7  # what the user sets wins
    config = trainer_config_from_values("x", resolve_values(set_values=["training.task=custom,training.entrypoint=a:b"]))
    assert config.training.num_classes == 10  # as before the task rules


def test_user_error_is_not_an_exception_leak():
    with pytest.raises(UserError, match="training.batchSize"):
        resolve_values(set_values=["training.batchSize=0"])


@pytest.mark.parametrize("verb", ["run", "render"])
@pytest.mark.parametrize("sets,missing", [
    ("checkpoint=null", "(root): checkpoint is missing"), ("s3=null", "(root): s3 is missing"),
    ("metrics=null", "(root): metrics is missing"), ("job=null", "(root): job is missing"),
    ("training=null", "(root): training is missing"), ("training.task=null", "training: task is missing"),
])
def test_a_null_that_deletes_a_section_or_the_task_is_named(tmp_path, verb, sets, missing):
    """Helm's null deletes a key, defaults included: without the section nothing can run or render."""
    workdir = tmp_path / "w"
    result = run_cli(verb, "x", *(["--workdir", str(workdir)] if verb == "run" else []), "--set", sets)
    _assert_user_error(result, missing)
    assert not workdir.exists()


def test_a_values_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("training:\n  task: caf\xe9\n".encode("latin-1"))
    result = run_cli("run", "x", "--workdir", str(tmp_path / "w"), "-f", str(path))
    _assert_user_error(result, f"{path}: not UTF-8 text", "save the values file as UTF-8")


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]\n" for prev, name in zip("abcdefg", "bcdefgh"))


@pytest.mark.parametrize("args, needles", [
    # Each of these once filled memory for minutes (10^8 list slots, 10^8 copied aliases) or ended in a
    # RecursionError traceback; helm refuses the first three at once.
    (["--set", "tolerations[99999999].effect=NoSchedule"],
     ["tolerations[99999999].effect", "index 99999999", "maximum supported index of 65536"]),
    (["--set-json", "tolerations[65537]={}"], ["--set-json", "index 65537", "65536"]),
    (["--set", "a" + ".a" * 31 + "=1"], ["nested 31 levels", "maximum supported nested level of 30"]),
    (["-f", "bomb.yaml"], ["bomb.yaml", "excessive aliasing"]),
    (["-f", "deep.yaml"], ["deep.yaml", "more than 100 levels deep"]),
    (["--set-json", "podLabels=" + "[" * 5000 + "]" * 5000], ["--set-json podLabels=...", "100 levels deep"]),
])
def test_values_that_make_work_grow_are_refused_at_once(tmp_path, args, needles):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    (tmp_path / "deep.yaml").write_text("podLabels: " + "[" * 5000 + "]" * 5000 + "\n")
    for verb in ("render", "run"):
        workdir = ["--workdir", str(tmp_path / "w")] if verb == "run" else []
        # A generous bound: the refusal takes well under a second; the bug took minutes and gigabytes.
        result = run_cli(verb, "x", *workdir, *args, cwd=tmp_path, timeout=20)
        _assert_user_error(result, *needles)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml", "deep.yaml"], "nothing written"


def test_helms_bounds_themselves_are_allowed():
    assert len(parse_set(["t[65536]=1"])["t"]) == 65537
    assert parse_set(["t[007]=1"])["t"][7] == 1
    deepest = parse_set(["a" + ".a" * 30 + "=1"])
    for _ in range(31):
        deepest = deepest["a"]
    assert deepest == 1


@pytest.mark.parametrize("value, side, takes", [
    ("100000000000000000000000", "up to 9223372036854775807", "a whole number of at least 1"),
    ("-100000000000000000000000", "down to -9223372036854775808", "a whole number of at least 1"),
    ("9" * 5000, "up to 9223372036854775807", "a whole number of at least 1"),  # int() refuses 4300+ digits
])
def test_an_integer_past_64_bits_says_the_range_not_the_same_command(tmp_path, value, side, takes):
    result = run_cli("run", "x", "--workdir", str(tmp_path / "w"), "--set", f"training.epochs={value}")
    _assert_user_error(result, "training.epochs: ", "is out of range", side, takes)
    assert f"--set training.epochs={value}" not in result.stderr, "the hint repeated the failed command"
    assert result.stderr.strip().splitlines()[0] == "Error: values do not match the chart's schema:"
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr  # the header and this one key
    assert not (tmp_path / "w").exists()


def test_an_out_of_range_count_names_its_bounds(tmp_path):
    result = run_cli("render", "x", "--set", "job.nodes=99999999999999999999")
    _assert_user_error(result, "job.nodes: 99999999999999999999 is out of range", "a whole number from 1 to 1024")
