"""Resuming an interrupted run from the database, and data loading from local files."""

from __future__ import annotations

import json

import pytest

from evalsuite import data, runner, store
from evalsuite.hf_model import HFModel
from evalsuite.tasks import TaskOptions
from server.db.engine import Database


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return HFModel(tiny_model_dir, batch_size=2, device="cpu")


@pytest.fixture
def db(tmp_path):
    return Database(f"sqlite:///{tmp_path / 'eval.db'}")


class Interrupting:
    """Passes the first `batches` batches through, then raises KeyboardInterrupt."""

    def __init__(self, model, batches: int):
        self.model, self.batches = model, batches
        self.name, self.chat_only = model.name, False
        self.seen = 0

    def _wrap(self, it):
        for batch in it:
            if self.seen == self.batches:
                raise KeyboardInterrupt
            self.seen += 1
            yield batch

    def loglikelihood(self, requests):
        return self._wrap(self.model.loglikelihood(requests))

    def generate(self, requests):
        return self._wrap(self.model.generate(requests))

    def describe(self):
        return self.model.describe()

    def identity(self):
        return self.model.identity()


def _prepared(fixtures, task="mmlu", **kw):
    folder = {"mmlu": "mmlu", "gsm8k": "gsm8k"}[task]
    return runner.prepare_task(task, TaskOptions(**kw), data.DataOptions(data=fixtures / folder))


@pytest.mark.parametrize("task,kw", [("mmlu", {}), ("gsm8k", {"limit": 5, "max_gen_toks": 12})])
def test_interrupted_run_resumes_where_it_stopped(fixtures, model, db, task, kw):
    prepared = _prepared(fixtures, task, **kw)
    total = len(prepared.docs)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(prepared, Interrupting(model, 2), db, model_identity=model.identity())
    [run] = store.list_runs(db)
    assert run.status == "interrupted" and 0 < run.n_samples < total

    calls = []
    counting = Interrupting(model, 10**6)
    original = counting._wrap

    def count(it):
        for batch in original(it):
            calls.append(len(batch))
            yield batch

    counting._wrap = count
    resumed = runner.run_eval(_prepared(fixtures, task, **kw), counting, db,
                              model_identity=model.identity())
    assert resumed.run_id == run.id and resumed.resumed == run.n_samples
    assert resumed.n_items == total == len(resumed.samples)
    # Only the remaining items went to the model (mmlu: 4 requests per item).
    per_item = 4 if task == "mmlu" else 1
    assert sum(calls) == (total - run.n_samples) * per_item
    [done] = store.list_runs(db)
    assert done.status == "finished" and done.n_samples == total
    # Same figures as a run that was never interrupted.
    fresh = runner.run_eval(_prepared(fixtures, task, **kw), model, db,
                            model_identity=model.identity(), resume=False)
    assert fresh.run_id != run.id
    assert fresh.metrics == resumed.metrics
    assert [s.to_dict() for s in fresh.samples] == [s.to_dict() for s in resumed.samples]


def test_different_options_do_not_resume(fixtures, model, db):
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(_prepared(fixtures, limit=2), Interrupting(model, 1), db,
                        model_identity=model.identity())
    other = runner.run_eval(_prepared(fixtures, limit=1), model, db,
                            model_identity=model.identity())
    assert other.resumed == 0


def _rows(fixtures, name):
    return [json.loads(x) for x in (fixtures / name).read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_local_formats_give_the_same_items(fixtures, tmp_path, fmt):
    import datasets

    for task, folder, files in (("mmlu", "mmlu", ("test", "dev")),
                                ("gsm8k", "gsm8k", ("test", "train"))):
        target = tmp_path / f"{task}-{fmt}"
        target.mkdir()
        for split in files:
            ds = datasets.Dataset.from_list(_rows(fixtures, f"{folder}/{split}.jsonl"))
            if fmt == "csv":
                ds = ds.map(lambda r: {"choices": json.dumps(r["choices"])} if "choices" in r
                            else {})
                ds.to_csv(target / f"{split}.csv", index=False)
            elif fmt == "parquet":
                ds.to_parquet(target / f"{split}-00000-of-00001.parquet")
            else:
                (target / f"{split}.json").write_text(json.dumps(ds.to_list()))
        opts = TaskOptions(num_fewshot=2) if task == "mmlu" else TaskOptions()
        ours = runner.prepare_task(task, opts, data.DataOptions(data=target))
        ref = runner.prepare_task(task, TaskOptions(num_fewshot=2) if task == "mmlu"
                                  else TaskOptions(), data.DataOptions(data=fixtures / folder))
        a = ours.task.build_items(ours.docs, ours.dataset.fewshot)
        b = ref.task.build_items(ref.docs, ref.dataset.fewshot)
        assert [x.prompt for x in a] == [x.prompt for x in b]
        assert [x.target for x in a] == [x.target for x in b]


def test_fewshot_data_file_and_split_override(fixtures):
    prepared = runner.prepare_task(
        "gsm8k", TaskOptions(num_fewshot=2),
        data.DataOptions(data=fixtures / "gsm8k" / "test.jsonl",
                         fewshot_data=fixtures / "gsm8k" / "train.jsonl"))
    assert len(prepared.dataset.fewshot) == 12
    # --split picks another file of a data directory: evaluate the train split.
    prepared = runner.prepare_task("gsm8k", TaskOptions(num_fewshot=0),
                                   data.DataOptions(data=fixtures / "gsm8k", split="train"))
    assert len(prepared.docs) == 12


def test_shared_prefix_gives_the_full_pass_results(fixtures, tiny_model_dir):
    """Few-shot prompts reuse their common prefix's key/value cache: same scores."""
    shared = HFModel(tiny_model_dir, batch_size=3, device="cpu")
    plain = HFModel(tiny_model_dir, batch_size=3, device="cpu", share_prefix=False)
    prepared = runner.prepare_task("mmlu", TaskOptions(num_fewshot=5),
                                   data.DataOptions(data=fixtures / "mmlu"))
    items = prepared.task.build_items(prepared.docs, prepared.dataset.fewshot)
    requests = [r for item in items for r in item.requests]
    clusters = list(shared._clusters({tuple(shared.tok_encode(r.context)): [(0, [1])]
                                      for r in requests}))
    assert all(prefix > 100 for prefix, _ in clusters) and len(clusters) == 4
    a = dict(x for batch in shared.loglikelihood(requests) for x in batch)
    b = dict(x for batch in plain.loglikelihood(requests) for x in batch)
    assert shared._share_prefix and shared._prefix_checked
    for i in range(len(requests)):
        assert a[i][0] == pytest.approx(b[i][0], abs=1e-4) and a[i][1] == b[i][1]
