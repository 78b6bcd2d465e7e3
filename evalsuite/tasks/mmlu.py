"""MMLU: 57-subject multiple choice, accuracy by loglikelihood of the answer letter.

Compatible with lm-evaluation-harness 0.4.x `mmlu` (tasks/mmlu/default): the subject
description `The following are multiple choice questions (with answers) about
{subject}.\\n\\n`, the question with its four lettered choices and `Answer:`, the
first K `dev` examples of the same subject as few-shot (0 by default, as lm-eval),
and the prediction is the highest loglikelihood among ` A`, ` B`, ` C`, ` D`.
Accuracy is reported overall, per category (STEM, humanities, social sciences,
other) and per subject, all micro-averaged over items.

Models that only offer chat get lm-eval's `mmlu_generative` variant instead: the
same prompt, greedy generation until a newline, the first line's letter compared
with the answer (case and punctuation ignored).
"""

from __future__ import annotations

from collections import defaultdict

from evalsuite import scoring
from evalsuite.tasks.base import Item, Request, Sample, Source, Task, fewshot_block
from server.errors import InvalidRequest

LETTERS = ("A", "B", "C", "D")

# lm-eval tasks/mmlu/_generate_configs.py
SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem",
    "college_mathematics": "stem", "college_medicine": "other", "college_physics": "stem",
    "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem",
    "elementary_mathematics": "stem", "formal_logic": "humanities",
    "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other",
    "marketing": "other", "medical_genetics": "other", "miscellaneous": "other",
    "moral_disputes": "humanities", "moral_scenarios": "humanities", "nutrition": "other",
    "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities",
    "professional_medicine": "other", "professional_psychology": "social_sciences",
    "public_relations": "social_sciences", "security_studies": "social_sciences",
    "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")

# lm-eval tasks/mmlu/generative/_default_template_yaml
GEN_UNTIL = ("</s>", "\n")


def description(subject: str) -> str:
    return ("The following are multiple choice questions (with answers) about "
            f"{' '.join(subject.split('_'))}.\n\n")


def doc_to_text(doc: dict) -> str:
    c = doc["choices"]
    return (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\n"
            "Answer:")


def category(subject: str) -> str:
    return SUBJECTS.get(subject, "other")


class MMLU(Task):
    name = "mmlu"
    title = "MMLU 57-subject multiple choice (accuracy)"
    source = Source("cais/mmlu", "all", "test", "dev", ("question", "subject", "choices",
                                                       "answer"))
    output_type = "loglikelihood"
    metrics = ("acc",)
    default_num_fewshot = 0
    prompt_doc = ("{description}{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:  "
                  "(loglikelihood of ' A'..' D'; K-shot = first K dev items of the subject)")

    @property
    def generative(self) -> bool:
        return bool(self.options.extra.get("generative"))

    def set_generative(self, on: bool) -> None:
        self.options.extra["generative"] = on
        self.output_type = "generate" if on else "loglikelihood"
        self.metrics = ("exact_match",) if on else ("acc",)

    def __init__(self, options):
        super().__init__(options)
        self.set_generative(bool(options.extra.get("generative")))

    def select(self, docs: list[dict]) -> list[dict]:
        """Keep --subjects; apply --limit per subject, as lm-eval does."""
        wanted = self.options.extra.get("subjects")
        if wanted:
            present = {d["subject"] for d in docs}
            missing = [s for s in wanted if s not in present]
            if missing:
                raise InvalidRequest(f"mmlu: no items for subject(s) {', '.join(missing)} in "
                                     "the data", param="subjects")
            docs = [d for d in docs if d["subject"] in wanted]
        limit = self.options.limit
        if limit is None:
            return docs
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for doc in docs:
            if seen[doc["subject"]] < limit:
                seen[doc["subject"]] += 1
                kept.append(doc)
        return kept

    def build_items(self, docs, fewshot_docs):
        k = self.num_fewshot
        by_subject: dict[str, list[dict]] = defaultdict(list)
        for doc in fewshot_docs or []:
            by_subject[doc["subject"]].append(doc)
        items = []
        for index, doc in enumerate(docs):
            subject = doc["subject"]
            answer = int(doc["answer"])
            if len(doc["choices"]) != 4 or not 0 <= answer < 4:
                raise InvalidRequest(f"mmlu item {index}: expected 4 choices and an answer "
                                     "0-3", param="data")
            shots = by_subject[subject][:k]
            if len(shots) < k:
                raise InvalidRequest(f"mmlu: {k}-shot needs {k} dev items for {subject}, "
                                     f"found {len(shots)}")
            prompt = description(subject) + fewshot_block(
                [(doc_to_text(s), LETTERS[int(s["answer"])]) for s in shots]) + doc_to_text(doc)
            if self.generative:
                requests = [Request(prompt, until=GEN_UNTIL, max_gen_toks=self.gen_toks)]
            else:
                requests = [Request(prompt, continuation=f" {letter}") for letter in LETTERS]
            items.append(Item(index, doc, prompt, LETTERS[answer], requests,
                              doc_id=f"{subject}/{index}",
                              meta={"subject": subject, "category": category(subject)}))
        return items

    def score(self, items, answers):
        samples = []
        for item, results in zip(items, answers, strict=True):
            extra = dict(item.meta)
            if self.generative:
                (output,) = results
                first = scoring.regex_extract(output, r"^(.*?)(?=\n|$)").strip()
                pred = scoring.regex_extract(first, r"^(.*?)\s*$")
                score = scoring.exact_match(pred, item.target, ignore_case=True,
                                            ignore_punctuation=True)
                samples.append(Sample(item.index, item.doc_id, item.prompt, output, pred,
                                      item.target, {"exact_match": score}, extra))
                continue
            lls = [ll for ll, _ in results]
            best = max(range(len(lls)), key=lambda i: (lls[i], -i))  # np.argmax: first max
            extra["loglikelihoods"] = lls
            samples.append(Sample(item.index, item.doc_id, item.prompt, LETTERS[best],
                                  LETTERS[best], item.target,
                                  {"acc": float(LETTERS[best] == item.target)}, extra))
        return samples

    def aggregate(self, samples):
        metric = self.metrics[0]
        result = super().aggregate(samples)
        groups: dict[str, dict[str, list[float]]] = {"category": defaultdict(list),
                                                     "subject": defaultdict(list)}
        for s in samples:
            groups["category"][s.extra["category"]].append(s.scores[metric])
            groups["subject"][s.extra["subject"]].append(s.scores[metric])
        result["breakdown"] = {
            kind: {name: scoring.summarize(values) for name, values in sorted(found.items())}
            for kind, found in groups.items()}
        return result

    def config(self):
        return {**super().config(), "variant": "generative" if self.generative
                else "loglikelihood"}
