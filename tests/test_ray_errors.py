"""Worker failures reach the user as the original one-line message, not Ray's traceback text."""

from __future__ import annotations

import traceback

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from mergetune.core.errors import ConfigError
from mergetune.search.ray_errors import worker_error_message


def _task_error(exc: BaseException) -> RayTaskError:
    try:
        raise exc
    except BaseException as raised:
        text = "".join(traceback.format_exception(raised))
    return RayTaskError("TrialWorker.__init__", text, exc, proctitle="ray::TrialWorker", pid=4242, ip="10.0.0.7")


def test_an_actor_whose_init_raised_a_user_error_gives_the_error_s_own_words():
    died = ActorDiedError(cause=_task_error(ConfigError("evaluator: cannot read /z/tasks/sort/search.jsonl (No such file or directory)")))
    assert len(str(died).splitlines()) > 2  # what Ray itself would print: its traceback
    assert worker_error_message(died) == "evaluator: cannot read /z/tasks/sort/search.jsonl (No such file or directory)"


def test_an_actor_whose_init_raised_something_else_gives_its_type_and_message():
    died = ActorDiedError(cause=_task_error(FileNotFoundError(2, "No such file or directory")))
    assert worker_error_message(died) == "FileNotFoundError: [Errno 2] No such file or directory"


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (ConfigError("method 'ties': density must be in (0, 1]"), "method 'ties': density must be in (0, 1]"),
        (RuntimeError("CUDA error: out of memory\nmore detail"), "RuntimeError: CUDA error: out of memory more detail"),
    ],
)
def test_a_task_error_gives_its_cause_on_one_line(cause, expected):
    assert worker_error_message(_task_error(cause)) == expected


def test_a_process_that_died_keeps_ray_s_first_line():
    assert worker_error_message(ActorDiedError()) == "The actor died unexpectedly before finishing this task."
