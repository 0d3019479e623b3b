"""gspo up's thread rule (ops/threads.py): explicit values win, otherwise producers get 1 thread each and
the learner the cores they leave plus one (shared with the producers), at least 1."""

from ops.threads import thread_plan


def test_learner_gets_the_cores_the_producers_leave():
    assert (thread_plan(1, cores=2).learner, thread_plan(1, cores=2).producer) == (2, 1)
    assert thread_plan(2, cores=8).learner == 7
    assert thread_plan(2, learner_ranks=2, cores=8).learner == 3
    assert thread_plan(0, cores=4).learner == 4  # no producer to share a core with


def test_never_below_one_thread():
    plan = thread_plan(4, cores=2)
    assert (plan.learner, plan.producer) == (1, 1)


def test_explicit_values_win():
    plan = thread_plan(1, learner_threads=2, producer_threads=3, cores=2)
    assert (plan.learner, plan.producer) == (2, 3)
    assert "as given" in plan.describe()
    assert thread_plan(1, producer_threads=2, cores=8).learner == 7
