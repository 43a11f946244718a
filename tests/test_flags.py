"""Each step's flags are its params dataclass: one field, one flag, one default (in-process, no step runs)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bertdistill import cli
from bertdistill.flags import add_flags, default, flag
from bertdistill.orchestration import plan as planning


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_step_is_a_subcommand_named_by_its_module():
    assert list(_subparsers()) == ["fetch-dump", "extract", "build-corpus", "make-examples", "fetch-teacher",
                                   "adapt-teacher", "label-teacher", "distill", "evaluate", "publish"]


@pytest.mark.parametrize("module", cli.STEPS, ids=cli.step_name)
def test_a_steps_flags_are_its_params_fields_with_their_defaults(module):
    parser = _subparsers()[cli.step_name(module)]
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(cli.params_class(module))}
    assert set(fields) <= set(actions)
    assert set(actions) - set(fields) == {"s3_endpoint_url", "log_level"}  # common to every step
    for name, field in fields.items():
        if field.default is dataclasses.MISSING:
            assert actions[name].required, name
        else:
            assert actions[name].default == field.default, name


def test_flags_check_types_minimums_and_choices():
    parse = cli.build_parser().parse_args
    args = parse(["distill", "--teacher", "t", "--labels", "l", "--output", "o", "--steps", "7", "--student-init",
                  "random", "--learning-rate", "1e-3"])
    assert (args.steps, args.student_init, args.learning_rate, args.student_hidden) == (7, "random", 1e-3, None)
    for bad in (["--steps", "0"], ["--student-init", "zeros"], ["--steps", "many"]):
        with pytest.raises(SystemExit) as exc:
            parse(["distill", "--teacher", "t", "--labels", "l", "--output", "o", *bad])
        assert exc.value.code == 2
    corpus = parse(["build-corpus", "--input", "a", "b", "--output", "o"])
    assert corpus.input == ["a", "b"]
    cased = parse(["make-examples", "--input", "i", "--output", "o", "--vocab-file", "v", "--no-lower-case"])
    assert cased.do_lower_case is False


def test_a_new_field_is_a_new_flag():
    """What adding a setting to a step takes: the field, its default and its help, in one place."""

    @dataclasses.dataclass
    class Params:
        output: str = flag(help="where")
        passes: int = flag(3, minimum=1, help="how many")
        dry_run: bool = flag(False, help="only say what would be done")

    parser = argparse.ArgumentParser()
    add_flags(parser, Params)
    assert vars(parser.parse_args(["--output", "o"])) == {"output": "o", "passes": 3, "dry_run": False}
    assert vars(parser.parse_args(["--output", "o", "--passes", "5", "--dry-run"]))["passes"] == 5
    assert "how many (default: 3)" in parser.format_help()


def test_a_field_without_help_is_refused_when_the_parser_is_built():
    @dataclasses.dataclass
    class Params:
        output: str

    with pytest.raises(TypeError, match=r"Params.output has no help text"):
        add_flags(argparse.ArgumentParser(), Params)


def test_the_form_takes_a_steps_default_from_the_step():
    from bertdistill.steps.build_corpus import BuildCorpusParams
    from bertdistill.steps.distill import DistillParams
    from bertdistill.steps.make_examples import MakeExamplesParams

    d = planning.DEFAULTS
    assert d["max_seq_length"] == default(MakeExamplesParams, "max_seq_length") == 128
    assert d["train_shards"] == default(BuildCorpusParams, "train_shards")
    assert d["top_k"] == default(DistillParams, "top_k")
    # on purpose not distill's 300: the monthly run trains a real student
    assert d["train_steps"] == 10_000 != default(DistillParams, "steps")
    with pytest.raises(KeyError, match="has no default"):
        default(DistillParams, "teacher")
