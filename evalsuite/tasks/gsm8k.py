"""GSM8K: grade-school maths word problems, exact match on the final number.

Compatible with lm-evaluation-harness 0.4.x `gsm8k` (tasks/gsm8k/gsm8k.yaml):
prompt `Question: {question}\\nAnswer:`, 5 few-shot examples drawn from `train` with
`random.Random(seed).sample` per document in order (seed 1234 by default), greedy
decoding until `Question:`, `</s>`, `<|im_end|>` (and the model's EOS), at most 256
new tokens. Two answer extractions are scored separately: `strict-match` (the
`#### N` line) and `flexible-extract` (the last number in the output).
"""

from __future__ import annotations

import random

from evalsuite import scoring
from evalsuite.tasks.base import Item, Request, Sample, Source, Task, fewshot_block

STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
# Applied to both the extracted answer and the reference (`... #### 72`).
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
FILTERS = {"strict-match": (STRICT, 0), "flexible-extract": (FLEXIBLE, -1)}


def doc_to_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


class GSM8K(Task):
    name = "gsm8k"
    title = "GSM8K grade-school maths (exact match)"
    source = Source("openai/gsm8k", "main", "test", "train", ("question", "answer"))
    output_type = "generate"
    metrics = ("exact_match,strict-match", "exact_match,flexible-extract")
    default_num_fewshot = 5
    until = ("Question:", "</s>", "<|im_end|>")
    prompt_doc = "Question: {question}\\nAnswer:  (5-shot from train, seed 1234)"

    def build_items(self, docs, fewshot_docs):
        k = self.num_fewshot
        rnd = random.Random(self.options.seed)
        pool = list(fewshot_docs or [])
        if k and len(pool) < k:
            from server.errors import InvalidRequest

            raise InvalidRequest(f"gsm8k: {k}-shot needs at least {k} few-shot documents, "
                                 f"the train split has {len(pool)}")
        items = []
        for index, doc in enumerate(docs):
            # One shared generator, drawn from per document in order, as lm-eval's
            # ContextSampler does; the eval split is not the few-shot split, so the
            # document itself is never excluded.
            shots = rnd.sample(pool, k) if k else []
            prompt = fewshot_block([(doc_to_text(s), s["answer"]) for s in shots])
            prompt += doc_to_text(doc)
            items.append(Item(index=index, doc=doc, prompt=prompt, target=doc["answer"],
                              requests=[Request(prompt, until=self.until,
                                                max_gen_toks=self.gen_toks)],
                              doc_id=str(index)))
        return items

    def score(self, items, answers):
        samples = []
        for item, (output,) in zip(items, answers, strict=True):
            extracted, scores = {}, {}
            for name, (pattern, group) in FILTERS.items():
                answer = scoring.regex_extract(output, pattern, group)
                extracted[name] = answer
                scores[f"exact_match,{name}"] = scoring.exact_match(
                    answer, item.target, regexes_to_ignore=IGNORE, ignore_case=True)
            samples.append(Sample(item.index, item.doc_id, item.prompt, output, extracted,
                                  item.target, scores))
        return samples
