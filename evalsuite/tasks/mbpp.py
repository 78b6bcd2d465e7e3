"""MBPP: write a Python function from a description; pass@1 by running its tests.

Compatible with lm-evaluation-harness 0.4.x `mbpp` (tasks/mbpp/mbpp.yaml): the
prompt names the task and its three tests and ends in `[BEGIN]\\n`; three fixed
few-shot exemplars (task ids 2, 3, 4, each `code\\n[DONE]`), greedy decoding until
`[DONE]` (and EOS). pass@1 executes completion + `\\n` + the three asserts in the
sandbox (evalsuite/sandbox.py): passed means exit status 0 within the limits.
Running model-written code needs `--allow-code-execution`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from evalsuite import sandbox
from evalsuite.tasks.base import Item, Request, Sample, Source, Task, fewshot_block
from server.errors import InvalidRequest

# lm-eval tasks/mbpp/utils.py list_fewshot_samples()
FEWSHOT = [
    {
        "task_id": 2,
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) "
                "& set(test_tup2))\r\n  return (res) ",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "task_id": 3,
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in "
                "range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            "
                "result = True\r\n    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "task_id": 4,
        "text": "Write a function to find the largest integers from a given list of numbers "
                "using heap queue algorithm.",
        "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = "
                "hq.nlargest(n, nums)\r\n  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, "
            "58, 35]",
        ],
    },
]


def doc_to_text(doc: dict) -> str:
    tests = doc["test_list"]
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests[0]}\n{tests[1]}\n{tests[2]}\n"
            "[BEGIN]\n")


def tests_of(doc: dict) -> str:
    return "\n".join(doc["test_list"][:3])


class MBPP(Task):
    name = "mbpp"
    title = "MBPP Python programming (pass@1, runs code in a sandbox)"
    source = Source("google-research-datasets/mbpp", "full", "test", None,
                    ("task_id", "text", "test_list"))
    output_type = "generate"
    metrics = ("pass@1",)
    default_num_fewshot = 3
    until = ("[DONE]",)
    workers = 4  # programs run side by side, each in its own sandbox
    prompt_doc = ("You are an expert Python programmer, and here is your task: {text} Your "
                  "code should pass these tests:\\n\\n{3 tests}\\n[BEGIN]\\n  (fixed 3-shot)")

    def check(self):
        super().check()
        if not self.options.allow_code_execution:
            raise InvalidRequest("mbpp runs model-written code: pass --allow-code-execution "
                                 "to allow it (each program runs in a sandbox)",
                                 param="allow_code_execution")
        sandbox.check(self.options.sandbox)  # refuse before generating, not after
        if self.num_fewshot > len(FEWSHOT):
            raise InvalidRequest(f"mbpp has {len(FEWSHOT)} fixed few-shot exemplars; "
                                 f"--num-fewshot {self.num_fewshot} is too many")

    def build_items(self, docs, fewshot_docs):
        shots = FEWSHOT[: self.num_fewshot]
        block = fewshot_block([(doc_to_text(s), f"{s['code']}\n[DONE]") for s in shots],
                              target_delimiter="")
        items = []
        for index, doc in enumerate(docs):
            if len(doc["test_list"]) < 3:
                raise InvalidRequest(f"mbpp item {index}: test_list needs 3 tests",
                                     param="data")
            prompt = block + doc_to_text(doc)
            items.append(Item(index, doc, prompt, tests_of(doc),
                              [Request(prompt, until=self.until, max_gen_toks=self.gen_toks)],
                              doc_id=str(doc["task_id"])))
        return items

    def score(self, items, answers):
        programs = [f"{output}\n{item.target}" for item, (output,) in zip(items, answers,
                                                                           strict=True)]
        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(
                lambda p: sandbox.run_program(p, config=self.options.sandbox), programs))
        return [Sample(item.index, item.doc_id, item.prompt, output, output, item.target,
                       {"pass@1": float(result.passed)},
                       {"status": result.status, **({"detail": result.detail}
                                                    if result.detail else {})})
                for item, (output,), result in zip(items, answers, results, strict=True)]
