"""A local transformers model for evals, item-for-item compatible with
lm-evaluation-harness 0.4.x's `hf` model (lm_eval/models/huggingface.py).

What is kept identical, because it decides the results:
- tokenisation: `tokenizer.encode(text)` with the tokenizer's own special tokens
  (none added when the text already starts with BOS); a context's trailing spaces
  move to the continuation; continuation tokens are those of `encode(ctx+cont)`
  past `len(encode(ctx))`; an empty context is the BOS (else EOS) token;
- loglikelihood: inputs `(ctx + cont)[-(max_length+1):][:-1]`, right-padded with
  zeros and no attention mask (causal attention makes the padding inert), the sum
  of log-softmax scores of the continuation tokens, and whether each was argmax;
- generation (`generation="batch"`; the default `"engine"` runs the same greedy
  decoding from the same prompt ids through continuous batching, engine_gen.py):
  contexts sorted by (-token length, text) and cut into batches of
  `batch_size`, left-padded and left-truncated to max_length - max_gen_toks,
  `model.generate(do_sample=False)` until every sequence in the batch has shown a
  stop string in its last len(stop)+2 tokens (the model's EOS string is a stop too),
  decoded without special tokens and cut at the first occurrence of each stop.

What is faster: requests that share `ctx + cont[:-1]` (MMLU's four letters) take
one forward pass; only the scored positions go through the LM head and the
log-softmax (`logits_to_keep`), instead of every position of every row; few-shot
prompts that share a prefix reuse its key/value cache.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterator

from evalsuite.models import EvalModel, LLResult
from evalsuite.tasks.base import Request
from server.errors import ConfigError

DEFAULT_MAX_LENGTH = 2048
MIN_SHARED_PREFIX = 32  # tokens; shorter shared prefixes are not worth a separate pass


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return device


class HFModel(EvalModel):
    def __init__(self, source: str, *, name: str | None = None, revision: str | None = None,
                 device: str | None = "auto", dtype: str = "auto",
                 max_length: int | None = None, batch_size: int = 8,
                 threads: int | None = None, share_prefix: bool = True,
                 generation: str = "engine"):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.name = name or source
        self.source = source
        self.batch_size = max(1, int(batch_size))
        self.device = _resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        from evalsuite.data import hub_offline

        kwargs = {"revision": revision} if revision else {}
        if hub_offline(source):
            kwargs["local_files_only"] = True  # the hub is out of reach: the cache or nothing
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype="auto" if dtype == "auto" else getattr(torch, dtype), **kwargs)
        except OSError as exc:
            raise ConfigError(f"model {self.name}: cannot load {source!r} "
                              f"({str(exc).strip().splitlines()[0][:160]})") from None
        self.model.to(self.device).eval()
        self._configure_pad_token()
        self._torch = torch
        self._max_length = max_length or self._config_max_length()
        params = inspect.signature(self.model.forward).parameters
        self._keep = "logits_to_keep" in params
        # Reusing a shared prefix's key/value cache: decoder-only models with the
        # standard cache; checked against a full forward pass on first use.
        # transformers 5.x names the argument `cache` (`past_key_values` before).
        self._cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        self._share_prefix = bool(share_prefix and self._cache_arg) and \
            not getattr(self.model.config, "is_encoder_decoder", False)
        self._prefix_checked = False
        # "engine": continuous batching (evalsuite/engine_gen.py); "batch": lm-eval's
        # static batches, for comparing batch by batch with lm-eval itself
        self.generation = generation
        self._engine = None

    # --- tokenisation (lm-eval TemplateLM / HFLM) ------------------------------------

    def _configure_pad_token(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is not None or tok.pad_token:
            return
        if tok.unk_token:
            tok.pad_token_id = tok.unk_token_id
        elif tok.eos_token:
            tok.pad_token_id = tok.eos_token_id
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})

    def _config_max_length(self) -> int:
        config = self.model.config
        config = getattr(config, "text_config", None) or config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if value:
                return int(value)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if limit and limit < 10**12:
            return int(limit)
        return DEFAULT_MAX_LENGTH

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        bos = self.tokenizer.decode(self.prefix_token_id)
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # --- loglikelihood ---------------------------------------------------------------

    def loglikelihood(self, requests: list[Request]) -> Iterator[list[tuple[int, LLResult]]]:
        # Group requests whose model input is the same: ctx + cont[:-1].
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            ctx, cont = self.encode_pair(req.context, req.continuation)
            if not cont:
                raise ConfigError(f"request {i}: the continuation encodes to no tokens")
            groups[tuple(ctx + cont[:-1])].append((i, cont))
        for prefix_len, keys in self._clusters(groups):
            keys = sorted(keys, key=lambda k: (-(len(k) + 1), k))
            prefix = self._prefix_cache(keys[0][:prefix_len]) if prefix_len else None
            if prefix and not self._prefix_checked:
                prefix = self._check_prefix(keys[0], groups[keys[0]], prefix)
            for start in range(0, len(keys), self.batch_size):
                batch = keys[start:start + self.batch_size]
                yield self._score_batch(batch, [groups[k] for k in batch], prefix)

    def _clusters(self, groups) -> Iterator[tuple[int, list[tuple[int, ...]]]]:
        """Inputs that share a long token prefix (a few-shot block, a subject's
        description) and the prefix length to compute once for them; 0 = no sharing."""
        if not self._share_prefix:
            yield 0, list(groups)
            return
        keys = sorted(groups)
        cluster: list[tuple[int, ...]] = []
        shared = 0

        def close():
            if len(cluster) < 2 or shared < MIN_SHARED_PREFIX:
                return 0, list(cluster)
            # Every scored position must lie past the prefix, and inputs are not truncated.
            cap = min(len(k) - max(len(c) for _, c in groups[k]) for k in cluster)
            n = min(shared, cap)
            fits = all(len(k) <= self.max_length for k in cluster)
            return (n if n >= MIN_SHARED_PREFIX and fits else 0), list(cluster)

        for key in keys:
            if cluster:
                lcp = _common_prefix(cluster[-1], key)
                if lcp < max(MIN_SHARED_PREFIX, shared // 2 if len(cluster) > 1 else 0):
                    yield close()
                    cluster, shared = [], 0
                else:
                    shared = lcp if len(cluster) == 1 else min(shared, lcp)
            cluster.append(key)
        if cluster:
            yield close()

    def _check_prefix(self, key, members, prefix):
        """The first time: the shared-prefix path must give what a full pass gives
        (to float noise), else this model does without it."""
        self._prefix_checked = True
        shared = self._score_batch([key], [members], prefix)
        full = self._score_batch([key], [members], None)
        if all(abs(a[1][0] - b[1][0]) <= 1e-3 for a, b in zip(shared, full, strict=True)):
            return prefix
        self._share_prefix = False
        return None

    def _prefix_cache(self, prefix: tuple[int, ...]):
        torch = self._torch
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = cache.layers
        return len(prefix), [(layer.keys, layer.values) for layer in layers]

    def _expand(self, prefix, rows: int):
        from transformers import DynamicCache

        _, kv = prefix
        return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                            for k, v in kv], config=self.model.config)

    def _score_batch(self, keys, members, prefix=None) -> list[tuple[int, LLResult]]:
        torch = self._torch
        skip = prefix[0] if prefix else 0
        inputs = [list(k)[-self.max_length:][skip:] for k in keys]
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        # The positions whose logits score a continuation token, per row.
        spans = []
        for x, group in zip(inputs, members, strict=True):
            longest = max(len(cont) for _, cont in group)
            spans.append((len(x) - longest, len(x)))
        with torch.inference_mode():
            cache = self._expand(prefix, len(inputs)) if prefix else None
            logprobs = self._logprobs(ids.to(self.device), spans, cache)
        results = []
        for (lo, hi), group, lp in zip(spans, members, logprobs, strict=True):
            greedy = lp.argmax(-1)
            for index, cont in group:
                n = len(cont)
                rows = lp[hi - lo - n:]
                target = torch.tensor(cont, device=rows.device)
                ll = rows.gather(1, target[:, None]).squeeze(1).sum()
                results.append((index, (float(ll), bool((greedy[hi - lo - n:] == target).all()))))
        return results

    def _logprobs(self, ids, spans, cache=None) -> list:
        """Log-softmax rows at each span's positions (a list of [len, vocab] tensors)."""
        torch = self._torch
        extra = {self._cache_arg: cache, "use_cache": True} if cache is not None else {}
        if self._keep:
            # Only the union of scored positions goes through the LM head.
            positions = sorted({p for lo, hi in spans for p in range(lo, hi)})
            where = {p: j for j, p in enumerate(positions)}
            logits = self.model(ids, logits_to_keep=torch.tensor(positions, device=ids.device),
                                **extra).logits
            out = []
            for row, (lo, hi) in enumerate(spans):
                cols = torch.tensor([where[p] for p in range(lo, hi)], device=ids.device)
                out.append(torch.log_softmax(logits[row, cols].float(), dim=-1))
            return out
        logits = self.model(ids, **extra).logits
        return [torch.log_softmax(logits[row, lo:hi].float(), dim=-1)
                for row, (lo, hi) in enumerate(spans)]

    # --- generation -------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> Iterator[list[tuple[int, str]]]:
        if self.generation == "engine":
            yield from self._generate_engine(requests)
            return
        by_kwargs: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[(req.until, req.max_gen_toks)].append(i)
        for (until, max_gen_toks), indices in by_kwargs.items():
            order = sorted(indices, key=lambda i: (-len(self.tok_encode(requests[i].context)),
                                                   requests[i].context))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = self._generate_batch([requests[i].context for i in chunk],
                                             list(until), max_gen_toks)
                yield list(zip(chunk, texts, strict=True))

    def _generate_engine(self, requests: list[Request]) -> Iterator[list[tuple[int, str]]]:
        """Every request in flight at once through the continuous-batching scheduler,
        longest prompts first (as lm-eval orders them), each cut like lm-eval's."""
        if self._engine is None:
            from transformers import AutoTokenizer

            from evalsuite.engine_gen import EngineGenerator

            self._engine = EngineGenerator(
                self.model, self.tokenizer, AutoTokenizer.from_pretrained(self.source),
                device=self.device, max_batch_size=self.batch_size, name=self.name)
        jobs, stops = [], {}
        for i, req in enumerate(requests):
            stops[i] = self.stop_strings(list(req.until))
            ids = self._prompt_ids(req.context, req.max_gen_toks)
            jobs.append((i, ids, req.max_gen_toks, tuple(s for s in stops[i] if s)))
        jobs.sort(key=lambda j: (-len(j[1]), requests[j[0]].context))
        for finished in self._engine.run(jobs):
            yield [(i, self._cut(self.tokenizer.decode(ids, skip_special_tokens=True),
                                 stops[i])) for i, ids in finished]

    def _prompt_ids(self, context: str, max_gen_toks: int) -> list[int]:
        """lm-eval's generation input: the context's tokens (special tokens added unless
        it starts with BOS), left-truncated to leave max_gen_toks in the context."""
        max_ctx = self.max_length - max_gen_toks
        if max_ctx <= 0:
            raise ConfigError(f"model {self.name}: {max_gen_toks} new tokens do not fit its "
                              f"{self.max_length}-token context")
        bos = self.tokenizer.bos_token
        extra = {"add_special_tokens": False} if bos and context.startswith(bos) else {}
        return self.tokenizer(context, **extra)["input_ids"][-max_ctx:]

    @staticmethod
    def _cut(text: str, stops: list[str]) -> str:
        for stop in stops:
            if stop:
                text = text.split(stop)[0]
        return text

    def stop_strings(self, until: list[str]) -> list[str]:
        eos = self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
        return until + [eos] if eos and eos not in until else until

    def _generate_batch(self, contexts: list[str], until: list[str], max_gen_toks: int):
        import transformers

        torch = self._torch
        stops = self.stop_strings(until)
        max_ctx = self.max_length - max_gen_toks
        if max_ctx <= 0:
            raise ConfigError(f"model {self.name}: {max_gen_toks} new tokens do not fit its "
                              f"{self.max_length}-token context")
        tok = self.tokenizer
        old_side, tok.padding_side = tok.padding_side, "left"
        try:
            bos = tok.bos_token
            extra = {"add_special_tokens": False} if bos and contexts[0].startswith(bos) else {}
            enc = tok(contexts, truncation=False, padding="longest", return_tensors="pt",
                      **extra)
        finally:
            tok.padding_side = old_side
        ids = enc["input_ids"][:, -max_ctx:].to(self.device)
        mask = enc["attention_mask"][:, -max_ctx:].to(self.device)
        width = ids.shape[1]
        criteria = transformers.StoppingCriteriaList(
            [_StopString(s, tok, width, len(contexts)) for s in stops])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      max_length=width + max_gen_toks,
                                      stopping_criteria=criteria, pad_token_id=tok.pad_token_id,
                                      use_cache=True, do_sample=False)
        return [self._cut(tok.decode(row[width:], skip_special_tokens=True), stops)
                for row in out.tolist()]

    def describe(self) -> dict:
        return {"name": self.name, "type": "local", "source": self.source,
                "device": self.device, "dtype": str(self.model.dtype).removeprefix("torch."),
                "max_length": self.max_length, "batch_size": self.batch_size}

    def identity(self) -> dict:
        return {"type": "local", "source": self.source,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "max_length": self.max_length}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.model = None


def _stop_string_class():
    import transformers

    class StopString(transformers.StoppingCriteria):
        """lm-eval's MultiTokenEOSCriteria: done once every row has shown the stop string
        in its last len(tokens(stop)) + 2 generated tokens; stops only the whole batch."""

        def __init__(self, sequence, tokenizer, start: int, batch_size: int):
            self.sequence = sequence
            self.start = start
            self.done = [False] * batch_size
            self.lookback = len(tokenizer.encode(sequence, add_special_tokens=False)) + 2
            self.tokenizer = tokenizer

        def __call__(self, input_ids, scores, **kwargs) -> bool:
            tails = self.tokenizer.batch_decode(input_ids[:, self.start:][:, -self.lookback:])
            for i, done in enumerate(self.done):
                if not done:
                    self.done[i] = self.sequence in tails[i]
            return False not in self.done

    return StopString


def _StopString(*args):  # noqa: N802 - built lazily so importing this module is cheap
    global _STOP_CLASS
    try:
        cls = _STOP_CLASS
    except NameError:
        cls = _STOP_CLASS = _stop_string_class()
    return cls(*args)
