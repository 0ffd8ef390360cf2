"""Job ids (cluster.serve.cancels) and the engine's memory of cancels for jobs not arrived yet
(cluster.engine.early_cancels)."""

import pickle

import pytest

from cluster.engine import JobCancelled, JobFailed
from cluster.engine.early_cancels import EarlyCancels
from cluster.serve.cancels import check_job_id
from stages.errors import InvalidInput


def test_a_cancel_is_consumed_once():
    cancels = EarlyCancels()
    cancels.add("job-1")
    assert not cancels.consume("job-2")
    assert cancels.consume("job-1")
    assert not cancels.consume("job-1")  # a later job with the same id runs


def test_the_oldest_cancels_are_forgotten_past_capacity():
    cancels = EarlyCancels(capacity=2)
    for job_id in ("a", "b", "c"):
        cancels.add(job_id)
    assert len(cancels) == 2
    assert [cancels.consume(j) for j in ("a", "b", "c")] == [False, True, True]


def test_an_expired_cancel_is_forgotten():
    cancels = EarlyCancels(memory_s=0.0)
    cancels.add("job-1")
    assert not cancels.consume("job-1")
    assert len(cancels) == 0


def test_re_adding_refreshes_the_order():
    cancels = EarlyCancels(capacity=2)
    cancels.add("a"), cancels.add("b"), cancels.add("a"), cancels.add("c")  # "b" is now the oldest
    assert [cancels.consume(j) for j in ("a", "b", "c")] == [True, False, True]


@pytest.mark.parametrize("job_id", ["0f3c", "early-1.retry_2", "x" * 64])
def test_valid_job_ids(job_id):
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "has space", "x" * 65, "semi;colon", "ünï", "a\nb"])
def test_invalid_job_ids_name_the_field(job_id):
    with pytest.raises(InvalidInput) as info:
        check_job_id(job_id)
    assert info.value.field == "job_id" and str(info.value).startswith("job_id: ")


def test_job_cancelled_crosses_processes():
    err = pickle.loads(pickle.dumps(JobCancelled("abc")))
    assert isinstance(err, JobCancelled) and err.job_id == "abc" and str(err) == "job abc was cancelled"


def test_job_failed_crosses_processes():
    err = pickle.loads(pickle.dumps(JobFailed("abc", "RuntimeError: boom")))
    assert isinstance(err, JobFailed) and err.job_id == "abc" and str(err) == "engine failed job abc: RuntimeError: boom"
