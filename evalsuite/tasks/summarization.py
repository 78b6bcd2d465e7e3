"""Summarization: CNN/DailyMail news articles, ROUGE against the highlights.

Compatible with lm-evaluation-harness 0.4.x `cnn_dailymail_abisee`: zero-shot prompt
`Summarize the following article:\\n\\n{article}\\n\\nSummary:`, greedy decoding for
at most 128 new tokens, until a blank line (lm-eval's default `until` when a task
sets none is its few-shot delimiter, `\\n\\n`) or EOS, ROUGE-1/2/L F-measure (`rouge_score`, Porter
stemming) after collapsing whitespace, averaged over items.
"""

from __future__ import annotations

from evalsuite import scoring
from evalsuite.tasks.base import Item, Request, Sample, Source, Task


def doc_to_text(doc: dict) -> str:
    return f"Summarize the following article:\n\n{doc['article']}\n\nSummary:"


class Summarization(Task):
    name = "summarization"
    title = "CNN/DailyMail summarization (ROUGE-1/2/L)"
    source = Source("abisee/cnn_dailymail", "3.0.0", "test", None, ("article", "highlights"))
    output_type = "generate"
    metrics = ("rouge1", "rouge2", "rougeL")
    default_num_fewshot = 0
    max_gen_toks = 128
    # lm-eval api/task.py: generation_kwargs without `until` get [fewshot_delimiter]
    until = ("\n\n",)
    prompt_doc = "Summarize the following article:\\n\\n{article}\\n\\nSummary:  (0-shot)"

    def check(self):
        super().check()
        if self.num_fewshot:
            from server.errors import InvalidRequest

            raise InvalidRequest("summarization is zero-shot; drop --num-fewshot")

    def build_items(self, docs, fewshot_docs):
        return [Item(i, doc, doc_to_text(doc), doc["highlights"],
                     [Request(doc_to_text(doc), until=self.until, max_gen_toks=self.gen_toks)],
                     doc_id=str(doc.get("id") or i))
                for i, doc in enumerate(docs)]

    def score(self, items, answers):
        return [Sample(item.index, item.doc_id, item.prompt, output,
                       scoring.normalize_whitespace(output), item.target,
                       scoring.rouge(output, item.target))
                for item, (output,) in zip(items, answers, strict=True)]
